// Sparse soft-target cross-entropy on CUDA tensors: shared checks, torch-free kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "soft_target_ce_op.h"

namespace vitfast {
namespace {

void check_rows(int64_t rows) {
  TORCH_CHECK(rows <= 2147483647, "vitfast.sparse_soft_target_cross_entropy: argument 'student_logits' has more ",
              "than 2^31-1 rows");
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits, const at::Tensor& values,
                                                const at::Tensor& indices, int64_t num_classes) {
  const c10::cuda::CUDAGuard guard(logits.device());
  SoftTargetCECall call = prepare_soft_target_ce_forward(logits, values, indices, num_classes);
  check_rows(call.params.rows);
  C10_CUDA_CHECK(static_cast<cudaError_t>(
      soft_target_ce_forward_cuda(call.params, at::cuda::getCurrentCUDAStream().stream())));
  return {call.loss, call.lse};
}

at::Tensor backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& values,
                         const at::Tensor& indices, const at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(logits.device());
  SoftTargetCECall call = prepare_soft_target_ce_backward(grad_loss, logits, values, indices, lse);
  check_rows(call.params.rows);
  C10_CUDA_CHECK(static_cast<cudaError_t>(
      soft_target_ce_backward_cuda(call.params, at::cuda::getCurrentCUDAStream().stream())));
  return call.grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("sparse_soft_target_ce_forward", &forward_cuda);
  m.impl("sparse_soft_target_ce_backward", &backward_cuda);
}

}  // namespace vitfast
