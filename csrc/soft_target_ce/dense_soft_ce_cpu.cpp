// CPU dense soft-target cross-entropy (dense_soft_ce.h). Each row is converted once into buffers
// of the math type (float, or double when either side is float64); sums accumulate in double.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/cpu_dtype.h"
#include "../common/cpu_math.h"
#include "dense_soft_ce.h"

namespace vitfast {
namespace {

inline float exp_np(float v) { return exp_nonpositive(v); }
inline double exp_np(double v) { return std::exp(v); }

// x[j] = scale * row[j] for row r of base (stride in elements); the dtype switch is per row, so
// each branch is a plain loop the compiler vectorises
template <typename Acc>
void load_scaled(const void* base, DType dt, int64_t stride, int64_t r, int64_t C, Acc scale, Acc* x) {
  const int64_t off = r * stride;
  switch (dt) {
    case DType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + off;
      for (int64_t j = 0; j < C; ++j) x[j] = scale * static_cast<Acc>(half_bits_to_float(src[j]));
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + off;
      for (int64_t j = 0; j < C; ++j) x[j] = scale * static_cast<Acc>(bf16_bits_to_float(src[j]));
      break;
    }
    case DType::kFloat32: {
      const float* src = static_cast<const float*>(base) + off;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) x[j] = scale * static_cast<Acc>(src[j]);
      break;
    }
    default: {
      const double* src = static_cast<const double*>(base) + off;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) x[j] = scale * static_cast<Acc>(src[j]);
    }
  }
}

// row r of the (rows, C) gradient in dtype dt
template <typename Acc>
void store_row(void* base, DType dt, int64_t r, int64_t C, const Acc* g) {
  if (dt == DType::kFloat32) {
    float* dst = static_cast<float*>(base) + r * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) dst[j] = static_cast<float>(g[j]);
  } else if (dt == DType::kFloat64) {
    double* dst = static_cast<double*>(base) + r * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) dst[j] = static_cast<double>(g[j]);
  } else {
    for (int64_t j = 0; j < C; ++j) host_store<Acc>(base, dt, r * C + j, g[j]);
  }
}

template <typename Acc>
VF_CPU_CLONES void rows(const DenseSoftCEParams& p, int64_t begin, int64_t end) {
  const int64_t C = p.cols;
  std::vector<Acc> a(static_cast<size_t>(C)), b(static_cast<size_t>(C));
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  for (int64_t r = begin; r < end; ++r) {
    load_scaled<Acc>(p.student, p.student_dtype, p.student_stride, r, C, static_cast<Acc>(p.student_scale), a.data());
    load_scaled<Acc>(p.teacher, p.teacher_dtype, p.teacher_stride, r, C, static_cast<Acc>(p.teacher_scale), b.data());
    const Acc* ar = a.data();
    const Acc* br = b.data();
    Acc ma = kNegInf, mb = kNegInf;
#pragma omp simd reduction(max : ma, mb)
    for (int64_t j = 0; j < C; ++j) {
      ma = ar[j] > ma ? ar[j] : ma;  // a NaN entry is skipped here and poisons the sums below
      mb = br[j] > mb ? br[j] : mb;
    }
    // the weighted mean of a is taken relative to the row's first logit: float precision at the
    // spread of a row's logits, not at their size (see the CUDA kernel)
    const Acc ref = std::isfinite(ar[0]) ? ar[0] : Acc(0);
    double sa = 0.0, sb = 0.0, cross = 0.0;
#pragma omp simd reduction(+ : sa, sb, cross)
    for (int64_t j = 0; j < C; ++j) {
      sa += exp_np(ar[j] - ma);
      // a teacher entry of -inf has probability 0 and adds nothing, whatever the student's
      const Acc w = br[j] == kNegInf ? Acc(0) : exp_np(br[j] - mb);
      sb += w;
      cross += w > Acc(0) ? static_cast<double>(w * (ar[j] - ref)) : 0.0;
    }
    const double loss = (static_cast<double>(ma) - static_cast<double>(ref)) + std::log(sa) - cross / sb;
    if (p.accumulate_double) static_cast<double*>(p.loss)[r] = loss;
    else static_cast<float*>(p.loss)[r] = static_cast<float>(loss);
    if (!p.grad) continue;
    // softmax(a) - q, each exponent as (x - max) - log(sum): no rounded lse near a large max
    const Acc la = static_cast<Acc>(std::log(sa)), lb = static_cast<Acc>(std::log(sb));
    const Acc gs = static_cast<Acc>(p.student_scale);
    // a teacher row without a finite logit has no softmax: NaN gradient, as its loss
    const Acc zero_q = sb > 0.0 ? Acc(0) : std::numeric_limits<Acc>::quiet_NaN();
    std::vector<Acc>& g = a;  // a's own entry is read before it is overwritten
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      const Acc q = br[j] == kNegInf ? zero_q : exp_np((br[j] - mb) - lb);
      g[j] = gs * (exp_np((ar[j] - ma) - la) - q);
    }
    store_row<Acc>(p.grad, p.student_dtype, r, C, g.data());
  }
}

}  // namespace

void dense_soft_ce_cpu_rows(const DenseSoftCEParams& p, int64_t begin, int64_t end) {
  if (p.accumulate_double) rows<double>(p, begin, end);
  else rows<float>(p, begin, end);
}

}  // namespace vitfast
