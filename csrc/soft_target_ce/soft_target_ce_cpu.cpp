// CPU sparse soft-target cross-entropy. Each row is converted once into a buffer of the
// accumulation type (double for float64 logits, else float); sums accumulate in double.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/cpu_math.h"
#include "../common/cpu_dtype.h"
#include "soft_target_ce.h"

namespace vitfast {
namespace {

double load_float(const void* base, DType dt, int64_t i) { return host_load<double>(base, dt, i); }

int64_t load_index(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kInt16:
      return static_cast<const int16_t*>(base)[i];
    case DType::kInt32:
      return static_cast<const int32_t*>(base)[i];
    default:
      return static_cast<const int64_t*>(base)[i];
  }
}

size_t elem_size(DType dt) { return dt == DType::kFloat64 ? 8 : (dt == DType::kFloat32 ? 4 : 2); }

// exp(v) for v <= 0: vectorisable for float, exact library call for double.
inline float exp_np(float v) { return exp_nonpositive(v); }
inline double exp_np(double v) { return std::exp(v); }

// Row r of the logits as Acc values.
template <typename Acc>
void load_row(const SoftTargetCEParams& p, int64_t r, std::vector<Acc>& x) {
  const char* row = static_cast<const char*>(p.logits) + r * p.row_stride * static_cast<int64_t>(elem_size(p.logits_dtype));
  switch (p.logits_dtype) {
    case DType::kFloat16:
      for (int64_t j = 0; j < p.cols; ++j) x[j] = half_bits_to_float(reinterpret_cast<const uint16_t*>(row)[j]);
      break;
    case DType::kBFloat16:
      for (int64_t j = 0; j < p.cols; ++j) x[j] = bf16_bits_to_float(reinterpret_cast<const uint16_t*>(row)[j]);
      break;
    case DType::kFloat32:
      for (int64_t j = 0; j < p.cols; ++j) x[j] = static_cast<Acc>(reinterpret_cast<const float*>(row)[j]);
      break;
    default:
      for (int64_t j = 0; j < p.cols; ++j) x[j] = static_cast<Acc>(reinterpret_cast<const double*>(row)[j]);
  }
}

// Remaining-mass target u and total target mass S of a row.
void target_mass(const SoftTargetCEParams& p, int64_t r, double* u, double* S) {
  double sv = 0.0;
  for (int i = 0; i < p.k; ++i) sv += load_float(p.values, p.values_dtype, r * p.k + i);
  *u = p.cols > p.k ? (1.0 - sv) / static_cast<double>(p.cols - p.k) : 0.0;
  *S = sv + *u * static_cast<double>(p.cols - p.k);
}

template <typename Acc>
int64_t forward_rows(const SoftTargetCEParams& p, int64_t begin, int64_t end) {
  std::vector<int64_t> seen(static_cast<size_t>(p.k));
  std::vector<Acc> x(static_cast<size_t>(p.cols));
  for (int64_t r = begin; r < end; ++r) {
    for (int i = 0; i < p.k; ++i) seen[i] = load_index(p.indices, p.indices_dtype, r * p.k + i);
    std::sort(seen.begin(), seen.end());
    if (seen.front() < 0 || seen.back() >= p.cols || std::adjacent_find(seen.begin(), seen.end()) != seen.end()) {
      return r + 1;
    }
    load_row(p, r, x);
    Acc m = -std::numeric_limits<Acc>::infinity();
    double sum_all = 0.0, s = 0.0;
    const Acc* xr = x.data();
    const int64_t C = p.cols;
    for (int64_t j = 0; j < C; ++j) m = std::max(m, xr[j]);
#pragma omp simd reduction(+ : sum_all, s)
    for (int64_t j = 0; j < C; ++j) {
      sum_all += xr[j];
      s += exp_np(xr[j] - m);
    }
    const double lse = static_cast<double>(m) + std::log(s);
    double u, S;
    target_mass(p, r, &u, &S);
    double sum_gathered = 0.0, dot = 0.0;
    for (int i = 0; i < p.k; ++i) {
      const double xi = x[load_index(p.indices, p.indices_dtype, r * p.k + i)];
      sum_gathered += xi;
      dot += load_float(p.values, p.values_dtype, r * p.k + i) * xi;
    }
    static_cast<Acc*>(p.loss)[r] = static_cast<Acc>(S * lse - (u * (sum_all - sum_gathered) + dot));
    static_cast<double*>(p.lse)[r] = lse;
  }
  return 0;
}

template <typename Acc>
void store_row(const SoftTargetCEParams& p, int64_t r, const std::vector<Acc>& g) {
  char* row = static_cast<char*>(p.grad_logits) + r * p.cols * static_cast<int64_t>(elem_size(p.logits_dtype));
  switch (p.logits_dtype) {
    case DType::kFloat16:
      for (int64_t j = 0; j < p.cols; ++j) reinterpret_cast<uint16_t*>(row)[j] = float_to_half_bits(static_cast<float>(g[j]));
      break;
    case DType::kBFloat16:
      for (int64_t j = 0; j < p.cols; ++j) reinterpret_cast<uint16_t*>(row)[j] = float_to_bf16_bits(static_cast<float>(g[j]));
      break;
    case DType::kFloat32:
      for (int64_t j = 0; j < p.cols; ++j) reinterpret_cast<float*>(row)[j] = static_cast<float>(g[j]);
      break;
    default:
      for (int64_t j = 0; j < p.cols; ++j) reinterpret_cast<double*>(row)[j] = static_cast<double>(g[j]);
  }
}

template <typename Acc>
int64_t backward_rows(const SoftTargetCEParams& p, int64_t begin, int64_t end) {
  std::vector<Acc> x(static_cast<size_t>(p.cols));
  for (int64_t r = begin; r < end; ++r) {
    for (int i = 0; i < p.k; ++i) {  // never write outside the row, whatever the caller passed
      const int64_t j = load_index(p.indices, p.indices_dtype, r * p.k + i);
      if (j < 0 || j >= p.cols) return r + 1;
    }
    load_row(p, r, x);
    const Acc g = static_cast<const Acc*>(p.grad_loss)[r * p.grad_stride];
    // lse = hi + lo: x - hi is exact for every x that matters (Sterbenz), so exp(x - lse) keeps
    // the logits' full resolution in Acc arithmetic
    const double lse = static_cast<const double*>(p.lse_in)[r];
    const Acc lse_hi = static_cast<Acc>(lse), lse_lo = static_cast<Acc>(lse - static_cast<double>(lse_hi));
    double u_d, S_d;
    target_mass(p, r, &u_d, &S_d);
    const Acc u = static_cast<Acc>(u_d), S = static_cast<Acc>(S_d);
    std::vector<Acc> stored(static_cast<size_t>(p.k));
    for (int i = 0; i < p.k; ++i) {  // read before x is overwritten in place
      const int64_t j = load_index(p.indices, p.indices_dtype, r * p.k + i);
      stored[i] = g * (S * std::exp((x[j] - lse_hi) - lse_lo) - static_cast<Acc>(load_float(p.values, p.values_dtype, r * p.k + i)));
    }
    Acc* xw = x.data();
    const int64_t C = p.cols;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) xw[j] = g * (S * exp_np((xw[j] - lse_hi) - lse_lo) - u);
    for (int i = 0; i < p.k; ++i) x[load_index(p.indices, p.indices_dtype, r * p.k + i)] = stored[i];
    store_row(p, r, x);
  }
  return 0;
}

}  // namespace

int64_t soft_target_ce_forward_cpu_rows(const SoftTargetCEParams& p, int64_t begin, int64_t end) {
  return p.logits_dtype == DType::kFloat64 ? forward_rows<double>(p, begin, end) : forward_rows<float>(p, begin, end);
}

int64_t soft_target_ce_backward_cpu_rows(const SoftTargetCEParams& p, int64_t begin, int64_t end) {
  return p.logits_dtype == DType::kFloat64 ? backward_rows<double>(p, begin, end) : backward_rows<float>(p, begin, end);
}

}  // namespace vitfast
