// Emulator binding of the covariance CUDA kernels (see module.cpp).
#include <torch/extension.h>

#include <string>

#include "covariance/covariance_op.h"
#include "covariance/covariance_split_gemm.h"
#include "covariance/covariance_cuda.cu"

namespace {

// gemm_chunk_rows: small values give the split-GEMM route several chunks on test-sized inputs.
// Returns the route taken: "split_gemm", "tensor_core" or "simt".
std::string update(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& y, const std::string& method,
                   int64_t gemm_chunk_rows) {
  int cc_major = 0;
  cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, 0);  // VITFAST_EMU_CC_MAJOR
  // 4 emulated SMs: small problems split into several row chunks, as on a real GPU
  const vitfast::CovarianceCudaCall call =
      vitfast::prepare_covariance_cuda(count, mean, m2, y, method, 4, cc_major, gemm_chunk_rows);
  using vitfast::CovarianceMethod;
  const std::string route = call.method == CovarianceMethod::kSplitGemm    ? "split_gemm"
                            : call.method == CovarianceMethod::kTensorCore ? "tensor_core"
                                                                           : "simt";
  if (call.params.rows == 0) return route;
  auto check = [](int err) { TORCH_CHECK(err == 0, "emulated covariance update failed with ", err); };
  if (call.method == CovarianceMethod::kSplitGemm) {
    // stands in for cuBLAS: bf16 values are exact in fp32, products and sums in fp32
    auto gemm = [](const at::Tensor& a, const at::Tensor& b) { return at::mm(a.t().to(at::kFloat), b.to(at::kFloat)); };
    vitfast::run_covariance_split_gemm(call, gemm, check, nullptr);
  } else {
    check(vitfast::covariance_update_cuda(call.params, call.method == CovarianceMethod::kTensorCore, nullptr));
  }
  return route;
}

}  // namespace

void register_covariance(pybind11::module_& m) {
  m.def("covariance_update_", &update, pybind11::arg("count"), pybind11::arg("mean"), pybind11::arg("m2"),
        pybind11::arg("y"), pybind11::arg("method") = "auto", pybind11::arg("gemm_chunk_rows") = vitfast::kGemmChunkRows);
}
