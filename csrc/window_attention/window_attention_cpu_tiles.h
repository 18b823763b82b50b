// Building blocks of the CPU window-attention kernels (plain and head-mixing): storage
// conversions, register-tiled small products, per-head tiles. Header-only and forced inline, so
// each instruction-set variant of a kernel (cpu_isa.h, VF_ISA_KERNEL below) gets its own vector
// code for them.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common/cpu_dtype.h"
#include "../common/cpu_isa.h"
#include "../common/cpu_math.h"
#include "window_attention.h"

namespace vitfast {
namespace wa_cpu {


#define VF_INLINE inline __attribute__((always_inline))

// exp(x) for x <= 0: the vectorised polynomial for float, std::exp for double.
VF_INLINE float exp_np(float x) { return exp_nonpositive(x); }
VF_INLINE double exp_np(double x) { return std::exp(x); }

// max_j x[j] over n entries, vectorised (a NaN entry may or may not win; either way the softmax
// built on it is NaN for that row, since exp(NaN - max) is NaN).
template <typename Acc>
VF_INLINE Acc row_max(const Acc* x, int32_t n) {
  Acc mx = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : mx)
  for (int32_t j = 0; j < n; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

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

// The shift mask as Acc, (n, n) per window type: a view when it is stored as Acc (Swin's float32
// buffer), else each type converted on first use (was a dtype switch per element, window and head).
template <typename Acc>
class MaskValues {
 public:
  explicit MaskValues(const WindowAttentionParams& p)
      : src_(p.mask), dtype_(p.mask_dtype), types_(p.mask_windows), nn_(static_cast<int64_t>(p.tokens) * p.tokens) {
    if (src_ == nullptr) return;
    constexpr DType kAcc = std::is_same<Acc, double>::value ? DType::kFloat64 : DType::kFloat32;
    if (dtype_ == kAcc) {
      view_ = static_cast<const Acc*>(src_);
    } else {
      owned_.reset(new Acc[static_cast<size_t>(types_ * nn_)]);  // uninitialised: filled per type
      ready_.assign(static_cast<size_t>(types_), false);
    }
  }

  // mask[w % types] (n x n), nullptr without a mask
  const Acc* window(int64_t w) {
    if (src_ == nullptr) return nullptr;
    const int64_t type = w % types_;
    if (view_ != nullptr) return view_ + type * nn_;
    Acc* out = owned_.get() + type * nn_;
    if (!ready_[type]) {
      for (int64_t e = 0; e < nn_; ++e) out[e] = host_load<Acc>(src_, dtype_, type * nn_ + e);
      ready_[type] = true;
    }
    return out;
  }

 private:
  const void* src_;
  DType dtype_;
  int64_t types_, nn_;
  const Acc* view_ = nullptr;
  std::unique_ptr<Acc[]> owned_;
  std::vector<bool> ready_;
};

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

// Register tiles of the small products: R rows x J columns of accumulators, J = tile_cols<isa,
// Acc>() (two vector registers per row), so each loaded element of the right operand feeds R FMAs.
// The forward passes take R = tile_rows_max<isa>() (8 rows, 16 accumulators, on AVX-512), the
// backward kR = 4 (its blocks of up to 32 rows share key-side tiles of kR keys). Kernels are
// templates on J and R, compiled once per instruction set (cpu_isa.h); every padded leading
// dimension below is a multiple of J.
constexpr int32_t kR = 4;

inline int32_t round_up(int32_t n, int32_t m) { return (n + m - 1) / m * m; }

// C[r][j] = sum_{c < kdim} A[r * lda + c] * B[c * ldb + j] for r < R, j < ldb. ldb is a multiple
// of J (B zero-padded), A has R readable rows; C has leading dim ldb.
template <int32_t J, int32_t R = kR, typename Acc>
VF_INLINE void gemm_rows(const Acc* A, int32_t lda, const Acc* B, int32_t ldb, int32_t kdim, Acc* C) {
  for (int32_t j0 = 0; j0 < ldb; j0 += J) {
    Acc acc[R][J] = {};
    for (int32_t c = 0; c < kdim; ++c) {
      const Acc* b = B + static_cast<size_t>(c) * ldb + j0;
      for (int32_t r = 0; r < R; ++r) {
        const Acc a = A[static_cast<size_t>(r) * lda + c];
#pragma omp simd
        for (int32_t jj = 0; jj < J; ++jj) acc[r][jj] += a * b[jj];
      }
    }
    for (int32_t r = 0; r < R; ++r)
      for (int32_t jj = 0; jj < J; ++jj) C[static_cast<size_t>(r) * ldb + j0 + jj] = acc[r][jj];
  }
}

// D[j][c] += sum_{r < kdim} A[r * lda + j] * X[r * ldx + c] for j < round_up(n, kR), c < ldd:
// D += A^T X, the key-side gradients (dK += dS^T Q, dV += P^T dO) of a block of kdim query rows.
// Register tiles of kR keys x J channels, so D is read and written once per block, not once per
// query row. ldd is a multiple of J; A has round_up(n, kR) readable columns, X ldd readable
// columns (zero padding: a padded column of A times anything finite adds 0).
template <int32_t J, typename Acc>
VF_INLINE void add_gemm_tn(const Acc* A, int32_t lda, const Acc* X, int32_t ldx, int32_t kdim, int32_t n,
                           int32_t ldd, Acc* D) {
  for (int32_t j0 = 0; j0 < n; j0 += kR) {
    for (int32_t c0 = 0; c0 < ldd; c0 += J) {
      Acc acc[kR][J];
      for (int32_t jr = 0; jr < kR; ++jr)
        for (int32_t cc = 0; cc < J; ++cc) acc[jr][cc] = D[static_cast<size_t>(j0 + jr) * ldd + c0 + cc];
      for (int32_t r = 0; r < kdim; ++r) {
        const Acc* x = X + static_cast<size_t>(r) * ldx + c0;
        const Acc* a = A + static_cast<size_t>(r) * lda + j0;
        for (int32_t jr = 0; jr < kR; ++jr) {
          const Acc av = a[jr];
#pragma omp simd
          for (int32_t cc = 0; cc < J; ++cc) acc[jr][cc] += av * x[cc];
        }
      }
      for (int32_t jr = 0; jr < kR; ++jr)
        for (int32_t cc = 0; cc < J; ++cc) D[static_cast<size_t>(j0 + jr) * ldd + c0 + cc] = acc[jr][cc];
    }
  }
}

// Query rows per block of the backward passes: the key-side products (add_gemm_tn) read and write
// their accumulators once per block, so more rows pay, until the block's scratch (`per_row` bytes
// a row) outgrows a core's L2 (~2 MB).
inline int32_t backward_block_rows(int32_t n, size_t per_row) {
  int32_t rows = 32;
  while (rows > kR && rows * per_row > (size_t{2} << 20)) rows /= 2;
  return std::min(rows, round_up(n, kR));
}

// One head of one window as contiguous, zero-padded Acc tiles.
template <typename Acc, DType DT>
struct HeadTiles {
  using S = Storage<DT>;
  std::vector<Acc> bias;

  // out[t][c] = src row t, channel c, for t < n (leading dim ld, rows_alloc rows, zeros elsewhere)
  static VF_INLINE void rows(const WindowAttentionParams& p, const void* src, const Strides3& s, int64_t w, int32_t off,
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
  static VF_INLINE void cols(const WindowAttentionParams& p, const void* src, const Strides3& s, int64_t w, int32_t off,
                   int32_t dim, int32_t ld, std::vector<Acc>& out) {
    const auto* base = static_cast<const typename S::T*>(src);
    out.assign(static_cast<size_t>(dim) * ld, Acc(0));
    for (int32_t t = 0; t < p.tokens; ++t) {
      const typename S::T* row = base + token_offset(p.grid, s.img, s.y, s.x, w, t) + off;
      for (int32_t c = 0; c < dim; ++c) out[static_cast<size_t>(c) * ld + t] = static_cast<Acc>(S::load(row[c]));
    }
  }

  // bias = table part (precomputed) + the window's mask (either may be absent), n x n
  void gather_bias(const WindowAttentionParams& p, const std::vector<Acc>& tbias, const Acc* mask, int32_t h) {
    const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens;
    if (tbias.empty()) {
      bias.assign(static_cast<size_t>(nn), Acc(0));
    } else {
      bias.assign(tbias.begin() + h * nn, tbias.begin() + (h + 1) * nn);
    }
    if (mask != nullptr) {
      Acc* b = bias.data();
#pragma omp simd
      for (int64_t e = 0; e < nn; ++e) b[e] += mask[e];
    }
  }
};

// Defines NAME<Acc, DT>(params, w_begin, w_end): BODY<Acc, DT, J, RT>(...) (a VF_INLINE template)
// compiled for AVX-512, AVX2 and baseline x86-64 with their tile widths J and tallest tiles RT,
// run as cpu_isa() picks.
#define VF_ISA_KERNEL(NAME, BODY, PARAMS)                                                        \
  template <typename Acc, DType DT>                                                               \
  VF_TARGET_AVX512 void NAME##_avx512(const PARAMS& p, int64_t w_begin, int64_t w_end) {          \
    constexpr CpuIsa kI = CpuIsa::kAvx512;                                                     \
    BODY<Acc, DT, tile_cols<kI, Acc>(), tile_rows_max<kI>()>(p, w_begin, w_end);               \
  }                                                                                              \
  template <typename Acc, DType DT>                                                               \
  VF_TARGET_AVX2 void NAME##_avx2(const PARAMS& p, int64_t w_begin, int64_t w_end) {              \
    constexpr CpuIsa kI = CpuIsa::kAvx2;                                                       \
    BODY<Acc, DT, tile_cols<kI, Acc>(), tile_rows_max<kI>()>(p, w_begin, w_end);               \
  }                                                                                              \
  template <typename Acc, DType DT>                                                               \
  void NAME##_base(const PARAMS& p, int64_t w_begin, int64_t w_end) {                            \
    constexpr CpuIsa kI = CpuIsa::kBase;                                                       \
    BODY<Acc, DT, tile_cols<kI, Acc>(), tile_rows_max<kI>()>(p, w_begin, w_end);               \
  }                                                                                              \
  template <typename Acc, DType DT>                                                               \
  void NAME(const PARAMS& p, int64_t w_begin, int64_t w_end) {                                   \
    switch (cpu_isa()) {                                                                         \
      case CpuIsa::kAvx512:                                                                      \
        return NAME##_avx512<Acc, DT>(p, w_begin, w_end);                                        \
      case CpuIsa::kAvx2:                                                                        \
        return NAME##_avx2<Acc, DT>(p, w_begin, w_end);                                          \
      default:                                                                                   \
        return NAME##_base<Acc, DT>(p, w_begin, w_end);                                          \
    }                                                                                            \
  }

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
