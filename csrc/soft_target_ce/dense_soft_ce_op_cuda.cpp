// vitfast::dense_soft_target_ce on CUDA tensors: shared checks, then the torch-free kernel on the
// current stream.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dense_soft_ce_op.h"

namespace vitfast {
namespace {

std::tuple<at::Tensor, at::Tensor> dense_soft_ce_cuda_impl(const at::Tensor& student, const at::Tensor& teacher,
                                                           double student_scale, double teacher_scale,
                                                           bool want_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  DenseSoftCECall call = prepare_dense_soft_ce(student, teacher, student_scale, teacher_scale, want_grad);
  C10_CUDA_CHECK(static_cast<cudaError_t>(dense_soft_ce_cuda(call.params, at::cuda::getCurrentCUDAStream().stream())));
  return {call.loss, call.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) { m.impl("dense_soft_target_ce", &dense_soft_ce_cuda_impl); }

}  // namespace vitfast
