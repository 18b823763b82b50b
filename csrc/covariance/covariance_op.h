// Glue shared by the CPU and CUDA registrations of vitfast::covariance_update_.
#pragma once

#include <ATen/ATen.h>

namespace vitfast {

// Validates (count, mean, m2, y); errors name the argument. Returns y with unit column stride.
at::Tensor check_covariance_args(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                 const at::Tensor& y, bool cuda);

}  // namespace vitfast
