// vitfast::covariance_update_: argument checks and the CPU implementation (float64, ATen BLAS).
#include "covariance_op.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include <ATen/MemoryOverlap.h>

#include "../common/torch_glue.h"

namespace vitfast {

at::Tensor check_covariance_args(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                 const at::Tensor& y, bool cuda) {
  constexpr const char* op = "covariance_update";
  VF_CHECK_VALUE(y.dim() == 2, op, "y", "must be 2-D (rows, features), got shape ", y.sizes());
  if (cuda) {
    check_dtype_in(y, {at::kHalf, at::kBFloat16, at::kFloat}, op, "y");
  } else {
    check_dtype_in(y, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, op, "y");
  }
  const int64_t m = y.size(1);
  VF_CHECK_VALUE(m >= 1, op, "y", "must have at least one feature column, got shape ", y.sizes());
  VF_CHECK_TYPE(count.scalar_type() == at::kDouble && count.dim() == 0, op, "count",
                "must be a 0-d float64 tensor, got ", dtype_name(count.scalar_type()), " of shape ", count.sizes());
  VF_CHECK_TYPE(mean.scalar_type() == at::kDouble, op, "mean", "must be float64, got ", dtype_name(mean.scalar_type()));
  VF_CHECK_TYPE(m2.scalar_type() == at::kDouble, op, "m2", "must be float64, got ", dtype_name(m2.scalar_type()));
  VF_CHECK_VALUE(mean.dim() == 1 && mean.size(0) == m && mean.is_contiguous(), op, "mean",
                 "must be a contiguous vector of y.shape[1] = ", m, " features, got shape ", mean.sizes());
  VF_CHECK_VALUE(m2.dim() == 2 && m2.size(0) == m && m2.size(1) == m && m2.is_contiguous(), op, "m2",
                 "must be a contiguous (", m, ", ", m, ") matrix, got shape ", m2.sizes());
  check_same_device(y, count, op, "y", "count");
  check_same_device(y, mean, op, "y", "mean");
  check_same_device(y, m2, op, "y", "m2");
  // the state is updated in place from itself and y: overlapping memory would corrupt it silently
  const at::Tensor* named[4] = {&count, &mean, &m2, &y};
  const char* names[4] = {"count", "mean", "m2", "y"};
  for (int i = 1; i < 4; ++i) {
    for (int j = 0; j < i; ++j) {
      const auto status = at::get_overlap_status(*named[i], *named[j]);
      // TooHard (a strided y): overlapping only if the two share a storage at all
      const bool overlap = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial ||
                           (status == at::MemOverlapStatus::TooHard &&
                            named[i]->storage().is_alias_of(named[j]->storage()));
      VF_CHECK_VALUE(!overlap, op, names[i], "must not share memory with '", names[j], "'");
    }
  }
  return rows_unit_stride(y);
}

CovarianceMethod parse_covariance_method(const std::string& method) {
  if (method == "auto") return CovarianceMethod::kAuto;
  if (method == "split_gemm") return CovarianceMethod::kSplitGemm;
  if (method == "tensor_core") return CovarianceMethod::kTensorCore;
  if (method == "simt") return CovarianceMethod::kSimt;
  VF_CHECK_VALUE(false, "covariance_update", "method",
                 "must be 'auto', 'split_gemm', 'tensor_core' or 'simt', got '", method, "'");
  return CovarianceMethod::kAuto;
}

int64_t covariance_gemm_chunk_rows() {
  const char* env = std::getenv("VITFAST_COVARIANCE_GEMM_ROWS");
  if (env == nullptr || *env == '\0') return kGemmChunkRows;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && v >= 64 && v <= 65536,
                    "covariance_update: environment variable VITFAST_COVARIANCE_GEMM_ROWS must be an integer in "
                    "[64, 65536], got '", env, "'");
  return v;
}

CovarianceCudaCall prepare_covariance_cuda(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                                           const at::Tensor& y_in, const std::string& method, int64_t sms,
                                           int cc_major, int64_t gemm_chunk_rows) {
  constexpr const char* op = "covariance_update";
  CovarianceCudaCall call;
  call.y = check_covariance_args(count, mean, m2, y_in, /*cuda=*/true);
  const int64_t rows = call.y.size(0), m = call.y.size(1);
  CovarianceMethod how = parse_covariance_method(method);
  if (how == CovarianceMethod::kAuto) {
    how = cc_major < 8                 ? CovarianceMethod::kSimt
          : (m >= 128 && m <= 8192)    ? CovarianceMethod::kSplitGemm
                                       : CovarianceMethod::kTensorCore;
  }
  VF_CHECK_VALUE(cc_major >= 8 || how == CovarianceMethod::kSimt, op, "method",
                 "'", method, "' needs compute capability 8.0 or newer (bf16/tf32 tensor cores); this GPU is ",
                 cc_major, ".x: use 'simt' or 'auto'");
  call.method = how;
  CovarianceParams& p = call.params;
  if (rows == 0) return call;
  int64_t chunks;
  if (how == CovarianceMethod::kSplitGemm) {
    chunks = (rows + gemm_chunk_rows - 1) / gemm_chunk_rows;
    VF_CHECK_VALUE(chunks <= 65535, op, "y", "has too many rows for one call (", rows, "); split it");
  } else {
    const int64_t tiles = (m + 63) / 64, pairs = tiles * (tiles + 1) / 2;
    chunks = std::max<int64_t>(1, std::min<int64_t>((4 * sms + pairs - 1) / pairs, (rows + 1023) / 1024));
    chunks = std::min<int64_t>(chunks, 65535);
  }
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  chunks = (rows + chunk_rows - 1) / chunk_rows;
  call.scratch = at::empty({chunks + 1, m}, mean.options());
  p.y = call.y.data_ptr();
  p.y_dtype = to_kernel_dtype(call.y.scalar_type());
  p.rows = rows;
  p.m = m;
  p.row_stride = rows > 1 ? call.y.stride(0) : m;
  p.chunk_rows = chunk_rows;
  p.chunk_mean = call.scratch.data_ptr<double>();
  p.mean = mean.data_ptr<double>();
  p.m2 = m2.data_ptr<double>();
  p.count = count.data_ptr<double>();
  return call;
}

// VITFAST_NO_REGISTRATION: the glue alone, for the CUDA emulator's test binding
#ifndef VITFAST_NO_REGISTRATION
namespace {

// Row blocks bound the float64 copy of y.
constexpr int64_t kCpuBlockRows = 4096;

// `method` picks a CUDA kernel; the CPU path is always float64 (the name is still validated).
void covariance_update_cpu(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& y_in,
                           c10::string_view method) {
  const at::Tensor y = check_covariance_args(count, mean, m2, y_in, /*cuda=*/false);
  parse_covariance_method(std::string(method));
  double n = count.item<double>();
  for (int64_t r0 = 0; r0 < y.size(0); r0 += kCpuBlockRows) {
    const at::Tensor yb = y.narrow(0, r0, std::min(kCpuBlockRows, y.size(0) - r0)).to(at::kDouble);
    const double nb = static_cast<double>(yb.size(0));
    const at::Tensor mu_b = yb.mean(0);
    const at::Tensor yc = yb - mu_b;
    const at::Tensor delta = mu_b - mean;
    const double total = n + nb;
    // Chan: M2 += G_b + delta delta^T * n nb / (n + nb); mean += delta nb / (n + nb)
    m2.add_(at::mm(yc.t(), yc)).addr_(delta, delta, 1.0, n * nb / total);
    mean.add_(delta, nb / total);
    n = total;
  }
  count.fill_(n);
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) { m.impl("covariance_update_", &covariance_update_cpu); }
#endif  // VITFAST_NO_REGISTRATION

}  // namespace vitfast
