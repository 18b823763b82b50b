// Dense soft-target cross-entropy with both sides as logits, loss and gradient in one pass:
// torch-free interface shared by the CPU and CUDA kernels.
//
// For one row with student logits s and teacher logits t (C entries each):
//   a      = student_scale * s,  b = teacher_scale * t     (scales: 1 / temperature, or d^-1/2)
//   lse_a  = logsumexp(a),  q = softmax(b)
//   loss   = -sum_j q_j log_softmax(a)_j = lse_a - sum_{j: q_j > 0} q_j a_j
//   grad_s = student_scale * (softmax(a) - q)             (d loss / d s, when wanted)
// The teacher's softmax and the student's log-softmax are never stored: one read of both rows for
// the loss, a second (cache-resident) read for the gradient, one write of the gradient. MiniViT's
// relation distillation runs it on every row of its (q, k, v) relation matrices (9 x N rows of N
// per window and relation head), where the eager form makes ~15 passes over float32 copies.
// Entries with q_j = 0 (teacher -inf) add nothing to the loss, even where a_j = -inf.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace vitfast {

struct DenseSoftCEParams {
  const void* student;     // (rows, cols), unit stride along cols
  DType student_dtype;     // kFloat16, kBFloat16, kFloat32, kFloat64
  int64_t student_stride;  // elements between rows
  const void* teacher;     // (rows, cols), unit stride along cols
  DType teacher_dtype;
  int64_t teacher_stride;
  int64_t rows;
  int64_t cols;            // 1 <= cols < 2^31
  double student_scale;
  double teacher_scale;
  bool accumulate_double;  // float64 math and loss when either side is float64, else float32
  void* loss;              // (rows,) float32, or float64 when accumulate_double
  void* grad;              // (rows, cols) contiguous in the student's dtype; nullptr: no gradient
};

// CPU: rows [begin, end); thread-safe for disjoint ranges.
void dense_soft_ce_cpu_rows(const DenseSoftCEParams& p, int64_t begin, int64_t end);

// CUDA: enqueue on `stream` (a cudaStream_t); returns a cudaError_t as int.
int dense_soft_ce_cuda(const DenseSoftCEParams& p, void* stream);

}  // namespace vitfast
