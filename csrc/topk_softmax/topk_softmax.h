// Top-k of a row-wise softmax: torch-free interface shared by the CPU and CUDA kernels.
//
// Semantics (the Python reference `vitfast.ops.reference.topk_softmax_reference` is the spec):
//  * p = softmax(x / T) per row, computed as exp((x - max) / T) / sum in float32.
//  * The k largest entries, sorted descending. Order is decided on the raw logits
//    (T > 0 preserves it); ties go to the lower class index first; -0.0 ties with +0.0.
//  * A row holding NaN or +inf, or only -inf, has no softmax: its k values are NaN and its
//    indices are 0..k-1. -inf alone is a valid logit (probability 0).
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace vitfast {

// Largest k either kernel accepts (the candidates are sorted in shared memory).
constexpr int kTopkMaxK = 2048;

struct TopkSoftmaxParams {
  const void* logits;      // (rows, cols), element stride 1 along cols
  DType logits_dtype;      // kFloat16, kBFloat16 or kFloat32
  int64_t rows;
  int64_t cols;            // number of classes, 1 <= cols < 2^31
  int64_t row_stride;      // in elements
  int32_t k;               // 1 <= k <= min(cols, kTopkMaxK)
  float inv_temperature;   // 1 / T, T > 0
  void* values;            // (rows, k) contiguous
  DType values_dtype;      // kFloat16 or kFloat32
  void* indices;           // (rows, k) contiguous
  DType indices_dtype;     // kInt16 (cols <= 32768) or kInt32
};

// CPU: processes rows [row_begin, row_end); thread-safe for disjoint ranges.
void topk_softmax_cpu_rows(const TopkSoftmaxParams& p, int64_t row_begin, int64_t row_end);

// CUDA: enqueues the whole problem on `stream` (a cudaStream_t). Returns a cudaError_t as int
// so that this header stays free of CUDA headers.
int topk_softmax_cuda(const TopkSoftmaxParams& p, void* stream);

}  // namespace vitfast
