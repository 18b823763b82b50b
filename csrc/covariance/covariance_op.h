// Glue shared by the CPU and CUDA registrations of vitfast::covariance_update_.
#pragma once

#include <ATen/ATen.h>

#include "covariance.h"

namespace vitfast {

// Validates (count, mean, m2, y); errors name the argument. Returns y with unit column stride.
at::Tensor check_covariance_args(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                 const at::Tensor& y, bool cuda);

struct CovarianceCudaCall {
  at::Tensor y, scratch;  // keep alive while the kernels run
  CovarianceParams params{};
};

// Checks, then plans the CUDA kernels: row chunks only to give small-m problems enough blocks
// (~4 per SM). params.rows == 0: nothing to do.
CovarianceCudaCall prepare_covariance_cuda(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                           const at::Tensor& y, int64_t sms);

}  // namespace vitfast
