// vitfast::sparse_soft_target_ce_{forward,backward}: argument checks, allocation, CPU impl.
#include "soft_target_ce_op.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>

#include "../common/torch_glue.h"

namespace vitfast {
namespace {

constexpr const char* kOp = "sparse_soft_target_cross_entropy";

at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks shared by forward and backward; fills the logits/values/indices part of the call.
void check_common(SoftTargetCECall& call, const at::Tensor& logits, const at::Tensor& values,
                  const at::Tensor& indices) {
  VF_CHECK_VALUE(logits.dim() == 2, kOp, "student_logits", "must be 2-D (batch, classes), got shape ",
                 logits.sizes());
  check_dtype_in(logits, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, kOp, "student_logits");
  check_dtype_in(values, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, kOp, "values");
  check_dtype_in(indices, {at::kShort, at::kInt, at::kLong}, kOp, "indices");
  check_same_device(logits, values, kOp, "student_logits", "values");
  check_same_device(logits, indices, kOp, "student_logits", "indices");
  const int64_t B = logits.size(0), C = logits.size(1);
  VF_CHECK_VALUE(C >= 1 && C <= std::numeric_limits<int32_t>::max(), kOp, "student_logits",
                 "must have between 1 and 2^31-1 classes, got ", C);
  VF_CHECK_VALUE(values.dim() == 2 && values.size(0) == B, kOp, "values", "must have shape (", B,
                 ", k) to match student_logits, got ", values.sizes());
  VF_CHECK_VALUE(indices.sizes() == values.sizes(), kOp, "indices", "must have the shape of 'values' ", values.sizes(),
                 ", got ", indices.sizes());
  const int64_t k = values.size(1);
  VF_CHECK_VALUE(k >= 1 && k <= C && k <= kSoftTargetMaxK, kOp, "values", "must hold k in [1, min(classes, ",
                 kSoftTargetMaxK, ")] = [1, ", std::min<int64_t>(C, kSoftTargetMaxK), "] entries per row, got ", k);
  call.logits = rows_unit_stride(logits);
  call.values = values.contiguous();
  call.indices = indices.contiguous();

  SoftTargetCEParams& p = call.params;
  p.logits = call.logits.data_ptr();
  p.logits_dtype = to_kernel_dtype(logits.scalar_type());
  p.rows = B;
  p.cols = C;
  p.row_stride = B > 1 ? call.logits.stride(0) : C;
  p.values = call.values.data_ptr();
  p.values_dtype = to_kernel_dtype(values.scalar_type());
  p.indices = call.indices.data_ptr();
  p.indices_dtype = to_kernel_dtype(indices.scalar_type());
  p.k = static_cast<int32_t>(k);
}

}  // namespace

SoftTargetCECall prepare_soft_target_ce_forward(const at::Tensor& logits, const at::Tensor& values,
                                                const at::Tensor& indices, int64_t num_classes) {
  SoftTargetCECall call;
  check_common(call, logits, values, indices);
  VF_CHECK_VALUE(num_classes == logits.size(1), kOp, "num_classes", "must equal student_logits.shape[1] = ",
                 logits.size(1), ", got ", num_classes);
  const auto opts = logits.options().dtype(acc_type(logits));
  call.loss = at::empty({logits.size(0)}, opts);
  // float64 whatever the logits: the backward needs lse to the logits' own resolution, and a
  // float32 lse around 1e4 is off by ~1e-3, which exp() turns into a relative gradient error
  call.lse = at::empty({logits.size(0)}, logits.options().dtype(at::kDouble));
  call.params.loss = call.loss.data_ptr();
  call.params.lse = call.lse.data_ptr();
  return call;
}

SoftTargetCECall prepare_soft_target_ce_backward(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                 const at::Tensor& values, const at::Tensor& indices,
                                                 const at::Tensor& lse) {
  SoftTargetCECall call;
  check_common(call, logits, values, indices);
  const int64_t B = logits.size(0);
  const auto acc = acc_type(logits);
  VF_CHECK_VALUE(grad_loss.dim() == 1 && grad_loss.size(0) == B, kOp, "grad_loss", "must have shape (", B, ",), got ",
                 grad_loss.sizes());
  VF_CHECK_VALUE(lse.dim() == 1 && lse.size(0) == B, kOp, "lse", "must have shape (", B, ",), got ", lse.sizes());
  check_same_device(logits, grad_loss, kOp, "student_logits", "grad_loss");
  check_same_device(logits, lse, kOp, "student_logits", "lse");
  // A broadcast scalar gradient (the usual mean/sum reduction) stays stride 0: no copy.
  call.grad_loss = grad_loss.to(acc);
  if (B > 1 && call.grad_loss.stride(0) != 0) call.grad_loss = call.grad_loss.contiguous();
  call.lse = lse.to(at::kDouble).contiguous();
  call.grad_logits = at::empty({B, logits.size(1)}, logits.options());
  SoftTargetCEParams& p = call.params;
  p.grad_loss = call.grad_loss.data_ptr();
  p.grad_stride = B > 1 ? call.grad_loss.stride(0) : 0;
  p.lse_in = call.lse.data_ptr();
  p.grad_logits = call.grad_logits.data_ptr();
  return call;
}

// VITFAST_NO_REGISTRATION: the glue alone, for the CUDA emulator's test binding
#ifndef VITFAST_NO_REGISTRATION
namespace {

// Runs fn(begin, end) over all rows in parallel; fn returns 0 or 1 + a bad row. Raises for the
// lowest bad row, naming `indices`.
template <typename F>
void rows_or_throw(int64_t rows, F fn) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    const int64_t r = fn(begin, end);
    if (r) {
      int64_t cur = bad.load();
      while (r - 1 < cur && !bad.compare_exchange_weak(cur, r - 1)) {
      }
    }
  });
  const int64_t row = bad.load();
  VF_CHECK_VALUE(row == std::numeric_limits<int64_t>::max(), kOp, "indices", "row ", row,
                 " has an entry out of [0, classes) or a duplicate; each row must list distinct classes");
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& logits, const at::Tensor& values,
                                               const at::Tensor& indices, int64_t num_classes) {
  SoftTargetCECall call = prepare_soft_target_ce_forward(logits, values, indices, num_classes);
  const SoftTargetCEParams p = call.params;
  rows_or_throw(p.rows, [&](int64_t b, int64_t e) { return soft_target_ce_forward_cpu_rows(p, b, e); });
  return {call.loss, call.lse};
}

at::Tensor backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& values,
                        const at::Tensor& indices, const at::Tensor& lse) {
  SoftTargetCECall call = prepare_soft_target_ce_backward(grad_loss, logits, values, indices, lse);
  const SoftTargetCEParams p = call.params;
  rows_or_throw(p.rows, [&](int64_t b, int64_t e) { return soft_target_ce_backward_cpu_rows(p, b, e); });
  return call.grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("sparse_soft_target_ce_forward", &forward_cpu);
  m.impl("sparse_soft_target_ce_backward", &backward_cpu);
}

#endif  // VITFAST_NO_REGISTRATION

}  // namespace vitfast
