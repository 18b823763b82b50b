// vitfast::dense_soft_target_ce: argument checks, allocation and the CPU implementation.
#include "dense_soft_ce_op.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../common/torch_glue.h"

namespace vitfast {

namespace {
constexpr const char* kOp = "dense_soft_target_cross_entropy";
}

DenseSoftCECall prepare_dense_soft_ce(const at::Tensor& student, const at::Tensor& teacher, double student_scale,
                                      double teacher_scale, bool want_grad) {
  VF_CHECK_VALUE(student.dim() == 2, kOp, "student_logits", "must be 2-D (rows, classes), got shape ",
                 student.sizes());
  check_dtype_in(student, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, kOp, "student_logits");
  check_dtype_in(teacher, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, kOp, "teacher_logits");
  check_same_device(student, teacher, kOp, "student_logits", "teacher_logits");
  VF_CHECK_VALUE(teacher.sizes() == student.sizes(), kOp, "teacher_logits", "must have the shape of 'student_logits' ",
                 student.sizes(), ", got ", teacher.sizes());
  const int64_t R = student.size(0), C = student.size(1);
  VF_CHECK_VALUE(C >= 1 && C <= std::numeric_limits<int32_t>::max(), kOp, "student_logits",
                 "must have between 1 and 2^31-1 classes, got ", C);
  VF_CHECK_VALUE(std::isfinite(student_scale) && student_scale > 0, kOp, "student_scale",
                 "must be finite and > 0, got ", student_scale);
  VF_CHECK_VALUE(std::isfinite(teacher_scale) && teacher_scale > 0, kOp, "teacher_scale",
                 "must be finite and > 0, got ", teacher_scale);

  DenseSoftCECall call;
  call.student = rows_unit_stride(student);
  call.teacher = rows_unit_stride(teacher);
  const bool dbl = student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble;
  call.loss = at::empty({R}, student.options().dtype(dbl ? at::kDouble : at::kFloat));
  call.grad = want_grad ? at::empty({R, C}, student.options().memory_format(at::MemoryFormat::Contiguous))
                        : at::empty({0}, student.options());

  DenseSoftCEParams& p = call.params;
  p.student = call.student.data_ptr();
  p.student_dtype = to_kernel_dtype(student.scalar_type());
  p.student_stride = R > 1 ? call.student.stride(0) : C;
  p.teacher = call.teacher.data_ptr();
  p.teacher_dtype = to_kernel_dtype(teacher.scalar_type());
  p.teacher_stride = R > 1 ? call.teacher.stride(0) : C;
  p.rows = R;
  p.cols = C;
  p.student_scale = student_scale;
  p.teacher_scale = teacher_scale;
  p.accumulate_double = dbl;
  p.loss = call.loss.data_ptr();
  p.grad = want_grad ? call.grad.data_ptr() : nullptr;
  return call;
}

// VITFAST_NO_REGISTRATION: the glue alone, for the CUDA emulator's test binding
#ifndef VITFAST_NO_REGISTRATION
namespace {

std::tuple<at::Tensor, at::Tensor> dense_soft_ce_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                     double student_scale, double teacher_scale, bool want_grad) {
  DenseSoftCECall call = prepare_dense_soft_ce(student, teacher, student_scale, teacher_scale, want_grad);
  const DenseSoftCEParams p = call.params;
  // grain: ~32K entries per task, so short rows (relations: 49-577 entries) still split evenly
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(p.cols, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) { dense_soft_ce_cpu_rows(p, begin, end); });
  return {call.loss, call.grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) { m.impl("dense_soft_target_ce", &dense_soft_ce_cpu); }
#endif  // VITFAST_NO_REGISTRATION

}  // namespace vitfast
