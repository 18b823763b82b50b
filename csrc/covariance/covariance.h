// Streaming covariance of a layer's output features: torch-free interface of the CUDA kernels.
//
// State (float64): count n, mean mu (m), M2 (m x m, upper triangle authoritative) with
// Cov = M2 / n. A batch Y (rows x m) is split into row chunks; chunk c has n_c rows, mean mu_c and
// centred Gram G_c = (Y_c - mu_c)^T (Y_c - mu_c) (fp32 products of centred values, so large
// feature means cannot cancel). With mu' the mean after the update, Chan's parallel merge is
//   M2' = M2 + n (mu - mu')(mu - mu')^T + sum_c [ G_c + n_c (mu_c - mu')(mu_c - mu')^T ]
// which the Gram kernel's epilogue applies per chunk with float64 atomics (the old state's term
// once, from chunk 0).
//
// Two ways to form G_c on the GPU (CovarianceMethod):
// - one kernel (covariance_update_cuda): tile pairs of the upper triangle, 3xTF32 tensor cores on
//   sm_80+ or fp32 SIMT, fp32 partial sums flushed into float64 every 256 rows;
// - split GEMM (covariance_split_cuda / covariance_flush_cuda around an external bf16 GEMM with
//   fp32 output, i.e. cuBLAS): each centred fp32 value c is split exactly-ish into bf16 planes
//   c = b0 + b1 (+ b2), b1 = bf16(c - b0), b2 = bf16(c - b0 - b1); two GEMMs over the stacked
//   planes S = [b1; b0; b2] give P = b1'b1 + b0'b0 and X = b1'b0 + b0'b2, and
//   G_c ~= P + X + X^T misses only terms of relative size 2^-24 (b1'b2, b2'b2). Three planes for
//   fp32 input, two for fp16/bf16 (their centred values need ~16 bits). Costs four (fp32) or two
//   bf16 GEMM passes at cuBLAS speed instead of three TF32 passes in our own mma.sync loop.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace vitfast {

enum class CovarianceMethod : int { kAuto = 0, kSplitGemm = 1, kTensorCore = 2, kSimt = 3 };

struct CovarianceParams {
  const void* y;          // (rows, m), unit stride along m
  DType y_dtype;          // kFloat16, kBFloat16, kFloat32
  int64_t rows;
  int64_t m;
  int64_t row_stride;     // elements
  int64_t chunk_rows;     // rows per chunk (the last may be shorter)
  double* chunk_mean;     // scratch (num_chunks, m) float64
  double* mean;           // (m) state mean, updated in place
  double* m2;             // (m, m) state M2, upper triangle updated in place
  double* count;          // 0-d state count n, read by the kernels and incremented at the end
};

// One-kernel route: enqueue the whole update on `stream` (tensor_cores: the 3xTF32 Gram, sm_80+,
// else the SIMT Gram); returns a cudaError_t as int.
int covariance_update_cuda(const CovarianceParams& p, bool tensor_cores, void* stream);

// Split-GEMM route, in this order on one stream (the caller runs the two GEMMs per chunk):
// chunk means and the new mean;
int covariance_means_cuda(const CovarianceParams& p, void* stream);
// chunk c's centred rows as `planes` (2 or 3) bf16 planes [b1; b0; b2], each (n_c, m) row-major,
// into `out` (raw bf16 bits);
int covariance_split_cuda(const CovarianceParams& p, int chunk, int planes, uint16_t* out, void* stream);
// M2 += P + X + X^T + Chan terms on the upper triangle, P and X (m, m) row-major float32;
int covariance_flush_cuda(const CovarianceParams& p, int chunk, const float* P, const float* X, void* stream);
// the new mean into the state, count += rows.
int covariance_finish_cuda(const CovarianceParams& p, void* stream);

}  // namespace vitfast
