// Sparse soft-target cross-entropy (TinyViT's distillation loss): torch-free interface.
//
// For one row with student logits x (C classes) and stored teacher top-k (values v, indices i):
//   u      = (1 - sum v) / (C - k)   if C > k, else 0      (the remaining mass, spread evenly)
//   t_j    = v_r if j == i_r, else u                        (never materialised)
//   S      = sum_j t_j = sum v + u (C - k)
//   lse    = logsumexp(x)
//   loss   = -sum_j t_j log_softmax(x)_j = S * lse - (u * (sum_j x_j - sum_r x_{i_r}) + sum_r v_r x_{i_r})
//   dloss/dx_j = S * softmax(x)_j - t_j
// Indices of a row must be distinct and in [0, C): the kernels check and fail loudly.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace vitfast {

constexpr int kSoftTargetMaxK = 2048;

struct SoftTargetCEParams {
  const void* logits;     // (rows, cols), unit stride along cols
  DType logits_dtype;     // kFloat16, kBFloat16, kFloat32, kFloat64
  int64_t rows;
  int64_t cols;           // 1 <= cols < 2^31
  int64_t row_stride;     // elements
  const void* values;     // (rows, k) contiguous
  DType values_dtype;     // kFloat16, kBFloat16, kFloat32, kFloat64
  const void* indices;    // (rows, k) contiguous
  DType indices_dtype;    // kInt16, kInt32, kInt64
  int32_t k;              // 1 <= k <= min(cols, kSoftTargetMaxK)
  // forward outputs, (rows,): loss in the accumulation type (float64 for float64 logits, else
  // float32), lse always float64 (what the backward needs at full resolution)
  void* loss;
  void* lse;
  // backward inputs/outputs
  const void* grad_loss;  // (rows,) accumulation type, element stride grad_stride (0: broadcast)
  int64_t grad_stride;
  const void* lse_in;     // forward's lse (float64)
  void* grad_logits;      // (rows, cols) contiguous, logits dtype
};

// CPU, rows [begin, end). Return 0 on success, or 1 + the first offending row when an index row
// is out of range (or, in the forward, has duplicates); the caller raises an error naming `indices`.
int64_t soft_target_ce_forward_cpu_rows(const SoftTargetCEParams& p, int64_t begin, int64_t end);
int64_t soft_target_ce_backward_cpu_rows(const SoftTargetCEParams& p, int64_t begin, int64_t end);

// CUDA: enqueue on `stream`; return a cudaError_t as int. Bad indices trap on the device
// (like PyTorch's device-side asserts) after printing the row.
int soft_target_ce_forward_cuda(const SoftTargetCEParams& p, void* stream);
int soft_target_ce_backward_cuda(const SoftTargetCEParams& p, void* stream);

}  // namespace vitfast
