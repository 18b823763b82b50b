// Glue shared by the CPU and CUDA registrations of vitfast::dense_soft_target_ce.
#pragma once

#include <ATen/ATen.h>

#include "dense_soft_ce.h"

namespace vitfast {

struct DenseSoftCECall {
  at::Tensor student, teacher;  // as the kernels take them (unit stride along classes)
  at::Tensor loss, grad;        // outputs; grad is (0,) when not wanted
  DenseSoftCEParams params{};
};

// Validates every argument (errors name it) and allocates the outputs.
DenseSoftCECall prepare_dense_soft_ce(const at::Tensor& student, const at::Tensor& teacher, double student_scale,
                                      double teacher_scale, bool want_grad);

}  // namespace vitfast
