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

// x[j] = scale * row[j] for one row of base (row r, stride in elements)
template <typename Acc>
void load_scaled(const void* base, DType dt, int64_t stride, int64_t r, int64_t C, Acc scale, Acc* x) {
  const int64_t off = r * stride;
  for (int64_t j = 0; j < C; ++j) x[j] = scale * host_load<Acc>(base, dt, off + j);
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
    for (int64_t j = 0; j < C; ++j) {
      ma = std::max(ma, ar[j]);
      mb = std::max(mb, br[j]);
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
    std::vector<Acc>& g = a;  // a's own entry is read before it is overwritten
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      const Acc q = br[j] == kNegInf ? Acc(0) : exp_np((br[j] - mb) - lb);
      g[j] = gs * (exp_np((ar[j] - ma) - la) - q);
    }
    for (int64_t j = 0; j < C; ++j) host_store<Acc>(p.grad, p.student_dtype, r * C + j, g[j]);
  }
}

}  // namespace

void dense_soft_ce_cpu_rows(const DenseSoftCEParams& p, int64_t begin, int64_t end) {
  if (p.accumulate_double) rows<double>(p, begin, end);
  else rows<float>(p, begin, end);
}

}  // namespace vitfast
