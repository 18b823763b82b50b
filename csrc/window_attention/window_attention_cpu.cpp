// Windowed attention on the CPU: one (window, head) at a time, blocks of 4 query rows in register
// tiles, exact softmax per query row.
// Accumulates in float (double for float64 inputs); same addressing as the CUDA kernels.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/cpu_dtype.h"
#include "../common/cpu_math.h"
#include "window_attention.h"

namespace vitfast {
namespace {

// Helpers are forced inline so that each target clone of the range functions gets its own
// vector code for them.
#define VF_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 0: the vectorised polynomial for float, std::exp for double.
VF_INLINE float exp_np(float x) { return exp_nonpositive(x); }
VF_INLINE double exp_np(double x) { return std::exp(x); }

// The table part of the bias, bias[h][i*N + j] = table[h, index[i, j]], gathered once per call
// (it does not depend on the window).
template <typename Acc>
std::vector<Acc> table_bias(const WindowAttentionParams& p) {
  const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens;
  std::vector<Acc> out;
  if (p.table == nullptr) return out;
  out.resize(static_cast<size_t>(p.heads * nn));
  for (int32_t h = 0; h < p.heads; ++h) {
    for (int64_t e = 0; e < nn; ++e) {
      const int64_t l = p.index_int64 ? static_cast<const int64_t*>(p.index)[e] : static_cast<const int32_t*>(p.index)[e];
      out[h * nn + e] = host_load<Acc>(p.table, p.table_dtype, h * p.table_stride_h + l * p.table_stride_l);
    }
  }
  return out;
}

// Element type and conversions of the qkv / output storage dtype (one dispatch per call, not per
// element).
template <DType DT>
struct Storage;
template <>
struct Storage<DType::kFloat16> {
  using T = uint16_t;
  static VF_INLINE float load(T v) { return half_bits_to_float(v); }
  static VF_INLINE T store(float v) { return float_to_half_bits(v); }
};
template <>
struct Storage<DType::kBFloat16> {
  using T = uint16_t;
  static VF_INLINE float load(T v) { return bf16_bits_to_float(v); }
  static VF_INLINE T store(float v) { return float_to_bf16_bits(v); }
};
template <>
struct Storage<DType::kFloat32> {
  using T = float;
  static VF_INLINE float load(T v) { return v; }
  static VF_INLINE T store(float v) { return v; }
};
template <>
struct Storage<DType::kFloat64> {
  using T = double;
  static VF_INLINE double load(T v) { return v; }
  static VF_INLINE T store(double v) { return v; }
};

// Register tiles of the small products: kR rows x kJ columns of accumulators (8 AVX2 registers
// for float), so each loaded element of the right operand feeds kR FMAs.
constexpr int32_t kR = 4;
constexpr int32_t kJ = 16;

inline int32_t round_up(int32_t n, int32_t m) { return (n + m - 1) / m * m; }

// C[r][j] = sum_{c < kdim} A[r * lda + c] * B[c * ldb + j] for r < kR, j < ldb. ldb is a multiple
// of kJ (B zero-padded), A has kR readable rows; C has leading dim ldb.
template <typename Acc>
VF_INLINE void gemm_rows(const Acc* A, int32_t lda, const Acc* B, int32_t ldb, int32_t kdim, Acc* C) {
  for (int32_t j0 = 0; j0 < ldb; j0 += kJ) {
    Acc acc[kR][kJ] = {};
    for (int32_t c = 0; c < kdim; ++c) {
      const Acc* b = B + static_cast<size_t>(c) * ldb + j0;
      for (int32_t r = 0; r < kR; ++r) {
        const Acc a = A[static_cast<size_t>(r) * lda + c];
#pragma omp simd
        for (int32_t jj = 0; jj < kJ; ++jj) acc[r][jj] += a * b[jj];
      }
    }
    for (int32_t r = 0; r < kR; ++r)
      for (int32_t jj = 0; jj < kJ; ++jj) C[static_cast<size_t>(r) * ldb + j0 + jj] = acc[r][jj];
  }
}

// D[j][c] += sum_{r < kR} A[r * lda + j] * X[r * ldx + c] for j < n, c < dim: a rank-kR update of
// an n x dim accumulator (ld dim).
template <typename Acc>
VF_INLINE void add_outer_rows(const Acc* A, int32_t lda, const Acc* X, int32_t ldx, int32_t n, int32_t dim, Acc* D) {
  const Acc *x0 = X, *x1 = X + ldx, *x2 = X + 2 * static_cast<size_t>(ldx), *x3 = X + 3 * static_cast<size_t>(ldx);
  for (int32_t j = 0; j < n; ++j) {
    const Acc a0 = A[j], a1 = A[lda + j], a2 = A[2 * static_cast<size_t>(lda) + j], a3 = A[3 * static_cast<size_t>(lda) + j];
    Acc* d = D + static_cast<size_t>(j) * dim;
#pragma omp simd
    for (int32_t c = 0; c < dim; ++c) d[c] += a0 * x0[c] + a1 * x1[c] + a2 * x2[c] + a3 * x3[c];
  }
}

// One head of one window as contiguous, zero-padded Acc tiles.
template <typename Acc, DType DT>
struct HeadTiles {
  using S = Storage<DT>;
  std::vector<Acc> bias;

  // out[t][c] = src row t, channel c, for t < n (leading dim ld, rows_alloc rows, zeros elsewhere)
  static void rows(const WindowAttentionParams& p, const void* src, const Strides3& s, int64_t w, int32_t off,
                   int32_t dim, int32_t ld, int32_t rows_alloc, std::vector<Acc>& out) {
    const auto* base = static_cast<const typename S::T*>(src);
    out.assign(static_cast<size_t>(rows_alloc) * ld, Acc(0));
    for (int32_t t = 0; t < p.tokens; ++t) {
      const typename S::T* row = base + token_offset(p.grid, s.img, s.y, s.x, w, t) + off;
      Acc* o = out.data() + static_cast<size_t>(t) * ld;
      for (int32_t c = 0; c < dim; ++c) o[c] = static_cast<Acc>(S::load(row[c]));
    }
  }

  // out[c][t] = src row t, channel c (dim x ld, ld >= n, zero-padded)
  static void cols(const WindowAttentionParams& p, const void* src, const Strides3& s, int64_t w, int32_t off,
                   int32_t dim, int32_t ld, std::vector<Acc>& out) {
    const auto* base = static_cast<const typename S::T*>(src);
    out.assign(static_cast<size_t>(dim) * ld, Acc(0));
    for (int32_t t = 0; t < p.tokens; ++t) {
      const typename S::T* row = base + token_offset(p.grid, s.img, s.y, s.x, w, t) + off;
      for (int32_t c = 0; c < dim; ++c) out[static_cast<size_t>(c) * ld + t] = static_cast<Acc>(S::load(row[c]));
    }
  }

  // bias = table part (precomputed) + mask[w % mask_windows] (0 where absent), n x n
  void gather_bias(const WindowAttentionParams& p, const std::vector<Acc>& tbias, int64_t w, int32_t h) {
    const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens;
    if (tbias.empty()) {
      bias.assign(static_cast<size_t>(nn), Acc(0));
    } else {
      bias.assign(tbias.begin() + h * nn, tbias.begin() + (h + 1) * nn);
    }
    if (p.mask != nullptr) {
      const int64_t base = (w % p.mask_windows) * nn;
      for (int64_t e = 0; e < nn; ++e) bias[e] += host_load<Acc>(p.mask, p.mask_dtype, base + e);
    }
  }
};

template <typename Acc, DType DT>
VF_CPU_CLONES void forward_range(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end) {
  using S = Storage<DT>;
  const int32_t n = p.tokens, dk = p.dim_k, dv = p.dim_v;
  const int32_t ldn = round_up(n, kJ), ldv = round_up(dv, kJ), rows_alloc = round_up(n, kR);
  const Acc scale = static_cast<Acc>(p.scale);
  const std::vector<Acc> tbias = table_bias<Acc>(p);
  HeadTiles<Acc, DT> t;
  std::vector<Acc> q, kt, v, s(static_cast<size_t>(kR) * ldn), o(static_cast<size_t>(kR) * ldv);
  auto* out = static_cast<typename S::T*>(p.out);
  for (int64_t w = w_begin; w < w_end; ++w) {
    for (int32_t h = 0; h < p.heads; ++h) {
      t.rows(p, p.qkv, p.qkv_strides, w, p.q_off + h * p.head_stride, dk, dk, rows_alloc, q);
      t.cols(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, ldn, kt);
      t.rows(p, p.qkv, p.qkv_strides, w, p.v_off + h * p.head_stride, dv, ldv, n, v);
      t.gather_bias(p, tbias, w, h);
      Acc* lse = static_cast<Acc*>(p.lse) + (w * p.heads + h) * n;
      for (int32_t i0 = 0; i0 < n; i0 += kR) {
        const int32_t rows = std::min(kR, n - i0);
        gemm_rows(&q[static_cast<size_t>(i0) * dk], dk, kt.data(), ldn, dk, s.data());  // S = Q K^T
        Acc l[kR] = {};
        for (int32_t r = 0; r < kR; ++r) {
          Acc* sr = &s[static_cast<size_t>(r) * ldn];
          if (r >= rows) {  // padding rows: P = 0
            std::fill(sr, sr + ldn, Acc(0));
            continue;
          }
          const Acc* br = &t.bias[static_cast<size_t>(i0 + r) * n];
          Acc mx = -std::numeric_limits<Acc>::infinity();
          for (int32_t j = 0; j < n; ++j) {
            sr[j] = scale * sr[j] + br[j];
            mx = sr[j] > mx ? sr[j] : mx;
          }
          Acc sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int32_t j = 0; j < n; ++j) {
            sr[j] = exp_np(sr[j] - mx);  // NaN for an all -inf row, like softmax
            sum += sr[j];
          }
          l[r] = sum;
          lse[i0 + r] = mx + std::log(sum);
        }
        gemm_rows(s.data(), ldn, v.data(), ldv, n, o.data());  // O = P V
        for (int32_t r = 0; r < rows; ++r) {
          typename S::T* dst = out +
                               token_offset(p.grid, p.out_strides.img, p.out_strides.y, p.out_strides.x, w, i0 + r) +
                               static_cast<int64_t>(h) * dv;
          const Acc inv = Acc(1) / l[r];
          for (int32_t c = 0; c < dv; ++c) dst[c] = S::store(o[static_cast<size_t>(r) * ldv + c] * inv);
        }
      }
    }
  }
}

template <typename Acc, DType DT>
VF_CPU_CLONES void backward_range(const WindowAttentionBackwardParams& b, int64_t w_begin, int64_t w_end) {
  using S = Storage<DT>;
  const WindowAttentionParams& p = b.fwd;
  const int32_t n = p.tokens, dk = p.dim_k, dv = p.dim_v;
  const int32_t ldn = round_up(n, kJ), ldk = round_up(dk, kJ), rows_alloc = round_up(n, kR);
  const Acc scale = static_cast<Acc>(p.scale);
  const std::vector<Acc> tbias = table_bias<Acc>(p);
  HeadTiles<Acc, DT> t;
  std::vector<Acc> q, k, kt, vt, o, dout, dk_acc, dv_acc;
  std::vector<Acc> s(static_cast<size_t>(kR) * ldn), dp(static_cast<size_t>(kR) * ldn),
      dq(static_cast<size_t>(kR) * ldk);
  Acc* dbias = static_cast<Acc*>(b.dbias);
  auto* grad = static_cast<typename S::T*>(b.grad_qkv);
  const Strides3& gs = b.grad_qkv_strides;
  for (int64_t w = w_begin; w < w_end; ++w) {
    for (int32_t h = 0; h < p.heads; ++h) {
      t.rows(p, p.qkv, p.qkv_strides, w, p.q_off + h * p.head_stride, dk, dk, rows_alloc, q);
      t.rows(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, ldk, n, k);
      t.cols(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, ldn, kt);
      t.cols(p, p.qkv, p.qkv_strides, w, p.v_off + h * p.head_stride, dv, ldn, vt);
      t.rows(p, p.out, p.out_strides, w, h * dv, dv, dv, n, o);
      t.rows(p, b.grad_out, p.out_strides, w, h * dv, dv, dv, rows_alloc, dout);
      t.gather_bias(p, tbias, w, h);
      dk_acc.assign(static_cast<size_t>(n) * dk, Acc(0));
      dv_acc.assign(static_cast<size_t>(n) * dv, Acc(0));
      const Acc* lse = static_cast<const Acc*>(p.lse) + (w * p.heads + h) * n;
      for (int32_t i0 = 0; i0 < n; i0 += kR) {
        const int32_t rows = std::min(kR, n - i0);
        const Acc* qi = &q[static_cast<size_t>(i0) * dk];
        const Acc* doi = &dout[static_cast<size_t>(i0) * dv];
        gemm_rows(qi, dk, kt.data(), ldn, dk, s.data());    // S = Q K^T
        gemm_rows(doi, dv, vt.data(), ldn, dv, dp.data());  // dP = dO V^T
        for (int32_t r = 0; r < kR; ++r) {
          Acc* sr = &s[static_cast<size_t>(r) * ldn];
          Acc* dpr = &dp[static_cast<size_t>(r) * ldn];
          if (r >= rows) {  // padding rows contribute nothing
            std::fill(sr, sr + ldn, Acc(0));
            std::fill(dpr, dpr + ldn, Acc(0));
            continue;
          }
          const Acc* dor = doi + static_cast<size_t>(r) * dv;
          const Acc* orow = &o[static_cast<size_t>(i0 + r) * dv];
          Acc d_r = 0;  // rowsum(dO * O)
#pragma omp simd reduction(+ : d_r)
          for (int32_t c = 0; c < dv; ++c) d_r += dor[c] * orow[c];
          const Acc* br = &t.bias[static_cast<size_t>(i0 + r) * n];
          const Acc lse_r = lse[i0 + r];
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) {
            sr[j] = exp_np(scale * sr[j] + br[j] - lse_r);  // P
            dpr[j] = sr[j] * (dpr[j] - d_r);                // dS
          }
          for (int32_t j = n; j < ldn; ++j) sr[j] = dpr[j] = 0;
          if (dbias != nullptr) {
            Acc* db = dbias + (static_cast<int64_t>(h) * n + i0 + r) * n;
#pragma omp simd
            for (int32_t j = 0; j < n; ++j) db[j] += dpr[j];
          }
        }
        gemm_rows(dp.data(), ldn, k.data(), ldk, n, dq.data());        // dQ = dS K
        add_outer_rows(dp.data(), ldn, qi, dk, n, dk, dk_acc.data());  // dK += dS^T Q
        add_outer_rows(s.data(), ldn, doi, dv, n, dv, dv_acc.data());  // dV += P^T dO
        for (int32_t r = 0; r < rows; ++r) {
          typename S::T* dst = grad + token_offset(p.grid, gs.img, gs.y, gs.x, w, i0 + r) + p.q_off + h * p.head_stride;
          for (int32_t c = 0; c < dk; ++c) dst[c] = S::store(scale * dq[static_cast<size_t>(r) * ldk + c]);
        }
      }
      for (int32_t j = 0; j < n; ++j) {
        typename S::T* row = grad + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + h * p.head_stride;
        for (int32_t c = 0; c < dk; ++c) row[p.k_off + c] = S::store(scale * dk_acc[static_cast<size_t>(j) * dk + c]);
        for (int32_t c = 0; c < dv; ++c) row[p.v_off + c] = S::store(dv_acc[static_cast<size_t>(j) * dv + c]);
      }
    }
  }
}

template <typename Acc>
void segment_sum(const Acc* dbias, const int64_t* order, const int64_t* bounds, int64_t heads, int64_t L, int64_t nn,
                 Acc* out) {
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t l = 0; l < L; ++l) {
      Acc sum = 0;
      for (int64_t e = bounds[l]; e < bounds[l + 1]; ++e) sum += dbias[h * nn + order[e]];
      out[h * L + l] = sum;
    }
}

}  // namespace

void window_attention_segment_sum_cpu(const void* dbias, bool f64, const int64_t* order, const int64_t* bounds,
                                      int64_t heads, int64_t L, int64_t nn, void* out) {
  if (f64) {
    segment_sum(static_cast<const double*>(dbias), order, bounds, heads, L, nn, static_cast<double*>(out));
  } else {
    segment_sum(static_cast<const float*>(dbias), order, bounds, heads, L, nn, static_cast<float*>(out));
  }
}

namespace {

// f(std::integral_constant<DType, dt>) for the run-time storage dtype
template <typename F>
void with_storage(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat16:
      return f(std::integral_constant<DType, DType::kFloat16>{});
    case DType::kBFloat16:
      return f(std::integral_constant<DType, DType::kBFloat16>{});
    case DType::kFloat32:
      return f(std::integral_constant<DType, DType::kFloat32>{});
    default:
      return f(std::integral_constant<DType, DType::kFloat64>{});
  }
}

// float accumulation, double for float64 inputs
template <DType DT>
using AccOf = std::conditional_t<DT == DType::kFloat64, double, float>;

}  // namespace

void window_attention_forward_cpu(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end) {
  with_storage(p.dtype, [&](auto dt) { forward_range<AccOf<dt.value>, dt.value>(p, w_begin, w_end); });
}

void window_attention_backward_cpu(const WindowAttentionBackwardParams& p, int64_t w_begin, int64_t w_end) {
  with_storage(p.fwd.dtype, [&](auto dt) { backward_range<AccOf<dt.value>, dt.value>(p, w_begin, w_end); });
}

}  // namespace vitfast
