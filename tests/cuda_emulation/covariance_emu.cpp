// Emulator binding of the covariance CUDA kernels (see module.cpp).
#include <torch/extension.h>

#include "covariance/covariance_op.h"
#include "covariance/covariance_cuda.cu"

namespace {

void update(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& y) {
  // 4 emulated SMs: small problems split into several row chunks, as on a real GPU
  const vitfast::CovarianceCudaCall call = vitfast::prepare_covariance_cuda(count, mean, m2, y, 4);
  if (call.params.rows == 0) return;
  const int err = vitfast::covariance_update_cuda(call.params, nullptr);
  TORCH_CHECK(err == 0, "emulated covariance update failed with ", err);
}

}  // namespace

void register_covariance(pybind11::module_& m) { m.def("covariance_update_", &update); }
