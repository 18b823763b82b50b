// vitfast::covariance_update_ on CUDA tensors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "covariance_op.h"

namespace vitfast {
namespace {

void covariance_update_cuda_impl(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& y_in) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const CovarianceCudaCall call = prepare_covariance_cuda(count, mean, m2, y_in, sms);
  if (call.params.rows == 0) return;
  C10_CUDA_CHECK(static_cast<cudaError_t>(covariance_update_cuda(call.params, at::cuda::getCurrentCUDAStream().stream())));
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) { m.impl("covariance_update_", &covariance_update_cuda_impl); }

}  // namespace vitfast
