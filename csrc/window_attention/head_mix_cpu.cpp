// Head-mixing (talking-heads) attention on the CPU: one window at a time, all heads together,
// blocks of query rows (4 or 8 forward, up to 32 backward), register tiles sized per instruction set.
// Whole score rows fit in memory here, so the softmax of the mixed scores is exact per row (the
// CUDA kernels need two passes over the keys for the same thing).
// Accumulates in float (double for float64 inputs); same addressing as the CUDA kernels.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "window_attention_cpu_tiles.h"

namespace vitfast {
namespace {

using namespace wa_cpu;

// dst[g] = sum_h w[g * H + h] * src[h] over `rows` rows of `len` entries (row stride ld), for all
// heads g; head pitch `pitch` in both buffers.
template <typename Acc>
VF_INLINE void mix_heads(const Acc* w, int32_t H, const Acc* src, Acc* dst, size_t pitch, int32_t rows, int32_t ld,
                         int32_t len) {
  for (int32_t g = 0; g < H; ++g) {
    for (int32_t r = 0; r < rows; ++r) {
      Acc* d = dst + g * pitch + static_cast<size_t>(r) * ld;
      {  // the first head sets d (no zero-fill pass)
        const Acc c = w[g * H];
        const Acc* s = src + static_cast<size_t>(r) * ld;
#pragma omp simd
        for (int32_t j = 0; j < len; ++j) d[j] = c * s[j];
      }
      for (int32_t h = 1; h < H; ++h) {
        const Acc c = w[g * H + h];
        const Acc* s = src + h * pitch + static_cast<size_t>(r) * ld;
#pragma omp simd
        for (int32_t j = 0; j < len; ++j) d[j] += c * s[j];
      }
    }
  }
}

// Same, transposed: dst[h] = sum_g w[g * H + h] * src[g] (the backward of mix_heads).
template <typename Acc>
VF_INLINE void mix_heads_t(const Acc* w, int32_t H, const Acc* src, Acc* dst, size_t pitch, int32_t rows,
                           int32_t ld, int32_t len) {
  for (int32_t h = 0; h < H; ++h) {
    for (int32_t r = 0; r < rows; ++r) {
      Acc* d = dst + h * pitch + static_cast<size_t>(r) * ld;
      {  // the first head sets d (no zero-fill pass)
        const Acc c = w[h];
        const Acc* s = src + static_cast<size_t>(r) * ld;
#pragma omp simd
        for (int32_t j = 0; j < len; ++j) d[j] = c * s[j];
      }
      for (int32_t g = 1; g < H; ++g) {
        const Acc c = w[g * H + h];
        const Acc* s = src + g * pitch + static_cast<size_t>(r) * ld;
#pragma omp simd
        for (int32_t j = 0; j < len; ++j) d[j] += c * s[j];
      }
    }
  }
}

// acc[g * H + h] += sum over rows, j < len of x[g][r][j] * y[h][r][j]
template <typename Acc>
VF_INLINE void add_head_products(const Acc* x, const Acc* y, int32_t H, size_t pitch, int32_t rows, int32_t ld,
                                 int32_t len, Acc* acc) {
  for (int32_t g = 0; g < H; ++g) {
    for (int32_t h = 0; h < H; ++h) {
      Acc sum = 0;
      for (int32_t r = 0; r < rows; ++r) {
        const Acc* a = x + g * pitch + static_cast<size_t>(r) * ld;
        const Acc* b = y + h * pitch + static_cast<size_t>(r) * ld;
#pragma omp simd reduction(+ : sum)
        for (int32_t j = 0; j < len; ++j) sum += a[j] * b[j];
      }
      acc[g * H + h] += sum;
    }
  }
}

// Per-window state both passes share: each head's q/k/v tiles, the table bias, the window's mask.
// Row blocks of `blk` query rows (a multiple of kR; the buffers' head pitch is blk * ldn).
template <typename Acc, DType DT, int32_t J>
struct WindowTiles {
  const WindowAttentionParams& p;
  int32_t n, ldn, ldk, rows_alloc;
  std::vector<Acc> tbias;                 // (H, n, n) table part of the bias
  MaskValues<Acc> masks;
  const Acc* mask = nullptr;              // (n, n) of this window, null without a mask
  std::vector<std::vector<Acc>> q, kt;    // q rows (rows_alloc x ldk), k columns (dk x ldn)

  WindowTiles(const WindowAttentionParams& params, int32_t blk)
      : p(params), n(params.tokens), ldn(round_up(params.tokens, J)), ldk(round_up(params.dim_k, J)),
        rows_alloc(round_up(params.tokens, blk)), tbias(table_bias<Acc>(params)), masks(params), q(params.heads),
        kt(params.heads) {}

  VF_INLINE void load(int64_t w) {
    for (int32_t h = 0; h < p.heads; ++h) {
      HeadTiles<Acc, DT>::rows(p, p.qkv, p.qkv_strides, w, p.q_off + h * p.head_stride, p.dim_k, ldk, rows_alloc,
                               q[h]);
      HeadTiles<Acc, DT>::cols(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, p.dim_k, ldn, kt[h]);
    }
    mask = masks.window(w);
  }

  // a[h] = scale * q_h k_h^T + table bias, rows i0 .. i0 + blk (padding rows and columns: 0)
  // (R rows a register tile; blk a multiple of R)
  template <int32_t R = kR>
  VF_INLINE void scores(int32_t i0, int32_t rows, int32_t blk, Acc* a, size_t pitch) const {
    const Acc scale = static_cast<Acc>(p.scale);
    for (int32_t h = 0; h < p.heads; ++h) {
      Acc* ah = a + h * pitch;
      for (int32_t r0 = 0; r0 < blk; r0 += R)
        gemm_rows<J, R>(&q[h][static_cast<size_t>(i0 + r0) * ldk], ldk, kt[h].data(), ldn, p.dim_k,
                     ah + static_cast<size_t>(r0) * ldn);
      for (int32_t r = 0; r < blk; ++r) {
        Acc* row = ah + static_cast<size_t>(r) * ldn;
        if (r >= rows) {
          std::fill(row, row + ldn, Acc(0));
          continue;
        }
        const Acc* b = tbias.empty() ? nullptr : &tbias[(static_cast<size_t>(h) * n + i0 + r) * n];
        if (b != nullptr) {
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) row[j] = scale * row[j] + b[j];
        } else {
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) row[j] = scale * row[j];
        }
      }
    }
  }

  // s[g] = sum_h pre[g, h] a[h] + mask, then p[g] = exp(s[g] - lse_g) with lse_g either given
  // (backward) or computed here and returned through lse_out (forward). Padding: 0.
  VF_INLINE void mixed_probs(const Acc* a, Acc* s, size_t pitch, int32_t i0, int32_t rows, int32_t blk,
                             const Acc* lse_in, Acc* lse_out, int64_t w) const {
    mix_heads(static_cast<const Acc*>(p.pre_mix), p.heads, a, s, pitch, blk, ldn, ldn);
    for (int32_t g = 0; g < p.heads; ++g) {
      for (int32_t r = 0; r < blk; ++r) {
        Acc* row = s + g * pitch + static_cast<size_t>(r) * ldn;
        if (r >= rows) {
          std::fill(row, row + ldn, Acc(0));
          continue;
        }
        if (mask != nullptr) {
          const Acc* m = mask + static_cast<size_t>(i0 + r) * n;
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) row[j] += m[j];
        }
        const int64_t stat = (w * p.heads + g) * n + i0 + r;
        if (lse_in != nullptr) {
          const Acc lse = lse_in[stat];
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) row[j] = exp_np(row[j] - lse);
        } else {  // one exp per entry: exp(s - max), then scaled by 1 / sum
          const Acc mx = row_max(row, n);
          Acc sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int32_t j = 0; j < n; ++j) {
            row[j] = exp_np(row[j] - mx);  // NaN for an all -inf row, like softmax
            sum += row[j];
          }
          lse_out[stat] = mx + std::log(sum);
          const Acc inv = Acc(1) / sum;
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) row[j] *= inv;
        }
        std::fill(row + n, row + ldn, Acc(0));
      }
    }
  }

  // out[g] = sum_h post[g, h] probs[h] + post_bias[g] on real entries, 0 on padding
  VF_INLINE void post_mixed(const Acc* probs, Acc* out, size_t pitch, int32_t rows, int32_t blk) const {
    mix_heads(static_cast<const Acc*>(p.post_mix), p.heads, probs, out, pitch, blk, ldn, n);
    const Acc* bias = static_cast<const Acc*>(p.post_mix_bias);
    for (int32_t g = 0; g < p.heads; ++g) {
      for (int32_t r = 0; r < blk; ++r) {
        Acc* row = out + g * pitch + static_cast<size_t>(r) * ldn;
        if (r >= rows) {
          std::fill(row, row + ldn, Acc(0));
          continue;
        }
        const Acc bg = bias[g];
#pragma omp simd
        for (int32_t j = 0; j < n; ++j) row[j] += bg;
        std::fill(row + n, row + ldn, Acc(0));
      }
    }
  }
};

// Forward: blocks of R query rows, one register tile tall (no key-side accumulation to share).
template <typename Acc, DType DT, int32_t J, int32_t R>
VF_INLINE void forward_body(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end) {
  using S = Storage<DT>;
  const int32_t n = p.tokens, dv = p.dim_v, H = p.heads;
  const int32_t ldv = round_up(dv, J);
  WindowTiles<Acc, DT, J> t(p, R);
  const size_t pitch = static_cast<size_t>(R) * t.ldn;
  std::vector<Acc> a(H * pitch), s(H * pitch), o(static_cast<size_t>(R) * ldv);
  std::vector<std::vector<Acc>> v(H);
  auto* out = static_cast<typename S::T*>(p.out);
  Acc* lse = static_cast<Acc*>(p.lse);
  for (int64_t w = w_begin; w < w_end; ++w) {
    t.load(w);
    for (int32_t h = 0; h < H; ++h)
      HeadTiles<Acc, DT>::rows(p, p.qkv, p.qkv_strides, w, p.v_off + h * p.head_stride, dv, ldv, n, v[h]);
    for (int32_t i0 = 0; i0 < n; i0 += R) {
      const int32_t rows = std::min(R, n - i0);
      t.template scores<R>(i0, rows, R, a.data(), pitch);
      t.mixed_probs(a.data(), s.data(), pitch, i0, rows, R, nullptr, lse, w);
      t.post_mixed(s.data(), a.data(), pitch, rows, R);  // a: the mixed probabilities P'
      for (int32_t g = 0; g < H; ++g) {
        gemm_rows<J, R>(&a[g * pitch], t.ldn, v[g].data(), ldv, n, o.data());  // O = P' V
        for (int32_t r = 0; r < rows; ++r) {
          typename S::T* dst = out +
                               token_offset(p.grid, p.out_strides.img, p.out_strides.y, p.out_strides.x, w, i0 + r) +
                               static_cast<int64_t>(g) * dv;
          for (int32_t c = 0; c < dv; ++c) dst[c] = S::store(o[static_cast<size_t>(r) * ldv + c]);
        }
      }
    }
  }
}

// Backward: blocks of backward_block_rows() query rows, so dK and dV (D += A^T X over the block)
// are register-tiled GEMMs rather than a pass over their accumulators per kR rows.
template <typename Acc, DType DT, int32_t J, int32_t /*RT: kR-row tiles throughout*/>
VF_INLINE void backward_body(const WindowAttentionBackwardParams& b, int64_t w_begin, int64_t w_end) {
  using S = Storage<DT>;
  const WindowAttentionParams& p = b.fwd;
  const int32_t n = p.tokens, dk = p.dim_k, dv = p.dim_v, H = p.heads;
  const int32_t ldk = round_up(dk, J), ldv = round_up(dv, J), ldn = round_up(n, J), n_pad = round_up(n, kR);
  // scratch a row of the block: five (H, ldn) buffers and dQ
  const int32_t blk = backward_block_rows(n, (static_cast<size_t>(5) * H * ldn + ldk) * sizeof(Acc));
  const Acc scale = static_cast<Acc>(p.scale);
  WindowTiles<Acc, DT, J> t(p, blk);
  const size_t pitch = static_cast<size_t>(blk) * ldn;
  // a: scores A; pr: probabilities P; dpm: dP' (gradient of the mixed probabilities); x, y: scratch
  std::vector<Acc> a(H * pitch), pr(H * pitch), dpm(H * pitch), x(H * pitch), y(H * pitch);
  std::vector<std::vector<Acc>> k(H), vt(H), dout(H), dk_acc(H), dv_acc(H);
  std::vector<Acc> dq(static_cast<size_t>(blk) * ldk);
  const Acc* lse = static_cast<const Acc*>(p.lse);
  const Acc* pre = static_cast<const Acc*>(p.pre_mix);
  const Acc* post = static_cast<const Acc*>(p.post_mix);
  Acc* g_pre = static_cast<Acc*>(b.grad_pre_mix);
  Acc* g_post = static_cast<Acc*>(b.grad_post_mix);
  Acc* g_post_bias = static_cast<Acc*>(b.grad_post_mix_bias);
  Acc* dbias = static_cast<Acc*>(b.dbias);
  auto* grad = static_cast<typename S::T*>(b.grad_qkv);
  const Strides3& gs = b.grad_qkv_strides;
  for (int64_t w = w_begin; w < w_end; ++w) {
    t.load(w);
    for (int32_t h = 0; h < H; ++h) {
      HeadTiles<Acc, DT>::rows(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, ldk, n, k[h]);
      HeadTiles<Acc, DT>::cols(p, p.qkv, p.qkv_strides, w, p.v_off + h * p.head_stride, dv, ldn, vt[h]);
      HeadTiles<Acc, DT>::rows(p, b.grad_out, p.out_strides, w, h * dv, dv, ldv, t.rows_alloc, dout[h]);
      dk_acc[h].assign(static_cast<size_t>(n_pad) * ldk, Acc(0));
      dv_acc[h].assign(static_cast<size_t>(n_pad) * ldv, Acc(0));
    }
    for (int32_t i0 = 0; i0 < n; i0 += blk) {
      const int32_t rows = std::min(blk, n - i0);
      t.scores(i0, rows, blk, a.data(), pitch);
      t.mixed_probs(a.data(), pr.data(), pitch, i0, rows, blk, lse, nullptr, w);
      for (int32_t g = 0; g < H; ++g)  // dP'_g = dO_g V_g^T
        for (int32_t r0 = 0; r0 < blk; r0 += kR)
          gemm_rows<J>(&dout[g][static_cast<size_t>(i0 + r0) * ldv], ldv, vt[g].data(), ldn, dv,
                       &dpm[g * pitch + static_cast<size_t>(r0) * ldn]);
      if (g_post != nullptr) add_head_products(dpm.data(), pr.data(), H, pitch, rows, ldn, n, g_post);
      if (g_post_bias != nullptr) {
        for (int32_t g = 0; g < H; ++g) {
          Acc sum = 0;
          for (int32_t r = 0; r < rows; ++r) {
            const Acc* dr = &dpm[g * pitch + static_cast<size_t>(r) * ldn];
#pragma omp simd reduction(+ : sum)
            for (int32_t j = 0; j < n; ++j) sum += dr[j];
          }
          g_post_bias[g] += sum;
        }
      }
      t.post_mixed(pr.data(), x.data(), pitch, rows, blk);  // x: P'
      for (int32_t g = 0; g < H; ++g)  // dV_g += P'_g^T dO_g
        add_gemm_tn<J>(&x[g * pitch], ldn, &dout[g][static_cast<size_t>(i0) * ldv], ldv, blk, n, ldv,
                       dv_acc[g].data());
      mix_heads_t(post, H, dpm.data(), y.data(), pitch, blk, ldn, ldn);  // y: dP = post^T dP'
      for (int32_t h = 0; h < H; ++h) {  // y: dS' = P (dP - rowsum(P dP))
        for (int32_t r = 0; r < blk; ++r) {
          Acc* dr = &y[h * pitch + static_cast<size_t>(r) * ldn];
          const Acc* pr_r = &pr[h * pitch + static_cast<size_t>(r) * ldn];
          if (r >= rows) {
            std::fill(dr, dr + ldn, Acc(0));
            continue;
          }
          Acc d = 0;
#pragma omp simd reduction(+ : d)
          for (int32_t j = 0; j < n; ++j) d += pr_r[j] * dr[j];
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) dr[j] = pr_r[j] * (dr[j] - d);
          std::fill(dr + n, dr + ldn, Acc(0));
        }
      }
      if (g_pre != nullptr) add_head_products(y.data(), a.data(), H, pitch, rows, ldn, n, g_pre);
      mix_heads_t(pre, H, y.data(), x.data(), pitch, blk, ldn, ldn);  // x: dA = pre^T dS'
      for (int32_t h = 0; h < H; ++h) {
        const Acc* da = &x[h * pitch];
        if (dbias != nullptr) {
          for (int32_t r = 0; r < rows; ++r) {
            Acc* db = dbias + (static_cast<int64_t>(h) * n + i0 + r) * n;
            const Acc* dr = da + static_cast<size_t>(r) * ldn;
#pragma omp simd
            for (int32_t j = 0; j < n; ++j) db[j] += dr[j];
          }
        }
        for (int32_t r0 = 0; r0 < blk; r0 += kR)  // dQ = dA K
          gemm_rows<J>(da + static_cast<size_t>(r0) * ldn, ldn, k[h].data(), ldk, n,
                       &dq[static_cast<size_t>(r0) * ldk]);
        for (int32_t r = 0; r < rows; ++r) {
          typename S::T* dst = grad + token_offset(p.grid, gs.img, gs.y, gs.x, w, i0 + r) + p.q_off + h * p.head_stride;
          for (int32_t c = 0; c < dk; ++c) dst[c] = S::store(scale * dq[static_cast<size_t>(r) * ldk + c]);
        }
        add_gemm_tn<J>(da, ldn, &t.q[h][static_cast<size_t>(i0) * ldk], ldk, blk, n, ldk,
                       dk_acc[h].data());  // dK += dA^T Q
      }
    }
    for (int32_t h = 0; h < H; ++h) {
      for (int32_t j = 0; j < n; ++j) {
        typename S::T* row = grad + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + h * p.head_stride;
        for (int32_t c = 0; c < dk; ++c) row[p.k_off + c] = S::store(scale * dk_acc[h][static_cast<size_t>(j) * ldk + c]);
        for (int32_t c = 0; c < dv; ++c) row[p.v_off + c] = S::store(dv_acc[h][static_cast<size_t>(j) * ldv + c]);
      }
    }
  }
}

VF_ISA_KERNEL(forward_range, forward_body, WindowAttentionParams)
VF_ISA_KERNEL(backward_range, backward_body, WindowAttentionBackwardParams)

}  // namespace

void head_mix_attention_forward_cpu(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end) {
  with_storage(p.dtype, [&](auto dt) { forward_range<AccOf<dt.value>, dt.value>(p, w_begin, w_end); });
}

void head_mix_attention_backward_cpu(const WindowAttentionBackwardParams& p, int64_t w_begin, int64_t w_end) {
  with_storage(p.fwd.dtype, [&](auto dt) { backward_range<AccOf<dt.value>, dt.value>(p, w_begin, w_end); });
}

}  // namespace vitfast
