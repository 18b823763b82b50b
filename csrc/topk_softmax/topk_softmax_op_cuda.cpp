// vitfast::topk_softmax on CUDA tensors: shared checks, then the torch-free kernel on the
// current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "topk_softmax_op.h"

namespace vitfast {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_softmax_cuda_impl(const at::Tensor& logits, int64_t k, double temperature,
                                                          std::optional<at::ScalarType> values_dtype) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TopkSoftmaxCall call = prepare_topk_softmax(logits, k, temperature, values_dtype);
  TORCH_CHECK(call.params.rows <= 2147483647, "vitfast.topk_softmax: argument 'logits' has more than 2^31-1 rows");
  C10_CUDA_CHECK(static_cast<cudaError_t>(topk_softmax_cuda(call.params, at::cuda::getCurrentCUDAStream().stream())));
  return {call.values, call.indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) { m.impl("topk_softmax", &topk_softmax_cuda_impl); }

}  // namespace vitfast
