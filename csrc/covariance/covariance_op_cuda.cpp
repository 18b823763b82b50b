// vitfast::covariance_update_ on CUDA tensors: the one-kernel route or the split-GEMM route.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "covariance_op.h"
#include "covariance_split_gemm.h"

namespace vitfast {
namespace {

void check_cuda(int err) { C10_CUDA_CHECK(static_cast<cudaError_t>(err)); }

void covariance_update_cuda_impl(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& y_in,
                                 c10::string_view method) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const CovarianceCudaCall call =
      prepare_covariance_cuda(count, mean, m2, y_in, std::string(method), prop->multiProcessorCount, prop->major,
                              covariance_gemm_chunk_rows());
  if (call.params.rows == 0) return;
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  if (call.method == CovarianceMethod::kSplitGemm) {
    // cuBLAS bf16 GEMM, fp32 accumulation and output (at::mm's out_dtype overload, torch >= 2.8)
    auto gemm = [](const at::Tensor& a, const at::Tensor& b) { return at::mm(a.t(), b, at::kFloat); };
    run_covariance_split_gemm(call, gemm, check_cuda, stream);
  } else {
    check_cuda(covariance_update_cuda(call.params, call.method == CovarianceMethod::kTensorCore, stream));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) { m.impl("covariance_update_", &covariance_update_cuda_impl); }

}  // namespace vitfast
