// The split-GEMM covariance route (maths in covariance.h): our kernels around two GEMMs per row
// chunk. Header-only so the CUDA registration (cuBLAS through at::mm with a float32 output) and
// the CUDA emulator's test binding (a CPU float32 GEMM) run the same sequence.
#pragma once

#include <ATen/ATen.h>

#include "covariance_op.h"

namespace vitfast {

// gemm(a, b) -> float32 a^T b for bf16 (k, m) row-major a and b; check(err) raises on a
// non-zero cudaError_t. Everything is enqueued on `stream`, in order.
template <typename Gemm, typename Check>
void run_covariance_split_gemm(const CovarianceCudaCall& call, Gemm&& gemm, Check&& check, void* stream) {
  const CovarianceParams& p = call.params;
  const int planes = p.y_dtype == DType::kFloat32 ? 3 : 2;
  const int64_t chunks = (p.rows + p.chunk_rows - 1) / p.chunk_rows;
  const at::Tensor planes_buf = at::empty({planes * std::min(p.chunk_rows, p.rows), p.m},
                                          call.y.options().dtype(at::kBFloat16));
  check(covariance_means_cuda(p, stream));
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t nc = std::min(p.chunk_rows, p.rows - c * p.chunk_rows);
    check(covariance_split_cuda(p, static_cast<int>(c), planes,
                                reinterpret_cast<uint16_t*>(planes_buf.data_ptr<at::BFloat16>()), stream));
    const at::Tensor s = planes_buf.narrow(0, 0, planes * nc);  // [b1; b0; b2]
    // P = b1'b1 + b0'b0 (fp32 input) or b0'b0; X = b1'b0 + b0'b2 or b1'b0
    const at::Tensor p_rows = planes == 3 ? s.narrow(0, 0, 2 * nc) : s.narrow(0, nc, nc);
    const at::Tensor gp = gemm(p_rows, p_rows);
    const at::Tensor gx = gemm(s.narrow(0, 0, (planes - 1) * nc), s.narrow(0, nc, (planes - 1) * nc));
    TORCH_INTERNAL_ASSERT(gp.scalar_type() == at::kFloat && gx.scalar_type() == at::kFloat &&
                          gp.is_contiguous() && gx.is_contiguous() && gp.size(0) == p.m && gx.size(1) == p.m);
    check(covariance_flush_cuda(p, static_cast<int>(c), gp.data_ptr<float>(), gx.data_ptr<float>(), stream));
  }
  check(covariance_finish_cuda(p, stream));
}

}  // namespace vitfast
