// Glue shared by the CPU and CUDA registrations of vitfast::covariance_update_.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "covariance.h"

namespace vitfast {

// Validates (count, mean, m2, y); errors name the argument. Returns y with unit column stride.
at::Tensor check_covariance_args(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                 const at::Tensor& y, bool cuda);

// "auto", "split_gemm", "tensor_core" or "simt"; anything else raises naming 'method'.
CovarianceMethod parse_covariance_method(const std::string& method);

// Rows per split-GEMM chunk: bounds the length of each GEMM's fp32 sums and the bf16 planes
// (3 x rows x m). Tensor cores accumulate with truncation, a biased error that grows linearly with
// k: benchmarks/covariance_accumulation_model.py puts the bar's data at ~3.8e-6 for 1,024 rows
// and ~1e-5 (the bar) for 2,048 with no guard bits. Each chunk's float64 flush moves ~4 m^2 words
// (~0.045 ms at m = 3072, ~1/2 of the chunk's GEMM time at 1,024 rows).
constexpr int64_t kGemmChunkRows = 1024;

// kGemmChunkRows, or VITFAST_COVARIANCE_GEMM_ROWS when set (64..65536; for tuning on a GPU).
int64_t covariance_gemm_chunk_rows();

struct CovarianceCudaCall {
  at::Tensor y, scratch;  // keep alive while the kernels run
  CovarianceParams params{};
  CovarianceMethod method = CovarianceMethod::kAuto;  // resolved
};

// Checks, resolves the method for a device of compute capability `cc_major` (auto: split GEMM on
// sm_80+ for 128 <= m <= 8192, where cuBLAS is efficient and the (m, m) fp32 GEMM outputs are
// small; else the 3xTF32 kernel on sm_80+, else SIMT), then plans the chunks: split GEMM ->
// `gemm_chunk_rows` rows each; one-kernel route -> chunks only to give small-m problems enough
// blocks (~4 per SM). params.rows == 0: nothing to do.
CovarianceCudaCall prepare_covariance_cuda(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                           const at::Tensor& y, const std::string& method, int64_t sms,
                                           int cc_major, int64_t gemm_chunk_rows = kGemmChunkRows);

}  // namespace vitfast
