// Streaming covariance of a layer's output features: torch-free interface of the CUDA kernels.
//
// State (float64): count n, mean mu (m), M2 (m x m, upper triangle authoritative) with
// Cov = M2 / n. A batch Y (rows x m) is split into row chunks; chunk c has n_c rows, mean mu_c and
// centred Gram G_c = (Y_c - mu_c)^T (Y_c - mu_c) (fp32 products of centred values, so large
// feature means cannot cancel). With mu' the mean after the update, Chan's parallel merge is
//   M2' = M2 + n (mu - mu')(mu - mu')^T + sum_c [ G_c + n_c (mu_c - mu')(mu_c - mu')^T ]
// which the Gram kernel's epilogue applies per chunk with float64 atomics, and a small kernel
// applies for the old state.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace vitfast {

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

// Enqueue the whole update on `stream`; returns a cudaError_t as int.
int covariance_update_cuda(const CovarianceParams& p, void* stream);

}  // namespace vitfast
