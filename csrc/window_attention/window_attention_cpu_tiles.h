// Building blocks of the CPU window-attention kernels (plain and head-mixing): storage
// conversions, register-tiled small products, per-head tiles. Header-only and forced inline, so
// each target clone of a kernel (VF_CPU_CLONES) gets its own vector code for them.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/cpu_dtype.h"
#include "../common/cpu_math.h"
#include "window_attention.h"

namespace vitfast {
namespace wa_cpu {


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

}  // namespace wa_cpu
}  // namespace vitfast
