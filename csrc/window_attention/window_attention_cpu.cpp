// Windowed attention on the CPU: one (window, head) at a time, blocks of query rows (4 or 8 forward,
// up to 32 backward) in register tiles sized per instruction set, exact softmax per query row.
// Accumulates in float (double for float64 inputs); same addressing as the CUDA kernels.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "window_attention_cpu_tiles.h"

namespace vitfast {
namespace {

using namespace wa_cpu;

// Forward: blocks of R query rows, one register tile tall.
template <typename Acc, DType DT, int32_t J, int32_t R>
VF_INLINE void forward_body(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end) {
  using S = Storage<DT>;
  const int32_t n = p.tokens, dk = p.dim_k, dv = p.dim_v;
  const int32_t ldn = round_up(n, J), ldv = round_up(dv, J), rows_alloc = round_up(n, R);
  const Acc scale = static_cast<Acc>(p.scale);
  const std::vector<Acc> tbias = table_bias<Acc>(p);
  MaskValues<Acc> masks(p);
  HeadTiles<Acc, DT> t;
  std::vector<Acc> q, kt, v, s(static_cast<size_t>(R) * ldn), o(static_cast<size_t>(R) * ldv);
  auto* out = static_cast<typename S::T*>(p.out);
  for (int64_t w = w_begin; w < w_end; ++w) {
    for (int32_t h = 0; h < p.heads; ++h) {
      t.rows(p, p.qkv, p.qkv_strides, w, p.q_off + h * p.head_stride, dk, dk, rows_alloc, q);
      t.cols(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, ldn, kt);
      t.rows(p, p.qkv, p.qkv_strides, w, p.v_off + h * p.head_stride, dv, ldv, n, v);
      t.gather_bias(p, tbias, masks.window(w), h);
      Acc* lse = static_cast<Acc*>(p.lse) + (w * p.heads + h) * n;
      for (int32_t i0 = 0; i0 < n; i0 += R) {
        const int32_t rows = std::min(R, n - i0);
        gemm_rows<J, R>(&q[static_cast<size_t>(i0) * dk], dk, kt.data(), ldn, dk, s.data());  // S = Q K^T
        Acc l[R] = {};
        for (int32_t r = 0; r < R; ++r) {
          Acc* sr = &s[static_cast<size_t>(r) * ldn];
          if (r >= rows) {  // padding rows: P = 0
            std::fill(sr, sr + ldn, Acc(0));
            continue;
          }
          const Acc* br = &t.bias[static_cast<size_t>(i0 + r) * n];
#pragma omp simd
          for (int32_t j = 0; j < n; ++j) sr[j] = scale * sr[j] + br[j];
          const Acc mx = row_max(sr, n);
          Acc sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int32_t j = 0; j < n; ++j) {
            sr[j] = exp_np(sr[j] - mx);  // NaN for an all -inf row, like softmax
            sum += sr[j];
          }
          l[r] = sum;
          lse[i0 + r] = mx + std::log(sum);
        }
        gemm_rows<J, R>(s.data(), ldn, v.data(), ldv, n, o.data());  // O = P V
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

// Backward: blocks of backward_block_rows() query rows, so dK and dV (D += A^T X over the block)
// are register-tiled GEMMs rather than a pass over their accumulators per kR rows.
template <typename Acc, DType DT, int32_t J, int32_t /*RT: kR-row tiles throughout*/>
VF_INLINE void backward_body(const WindowAttentionBackwardParams& b, int64_t w_begin, int64_t w_end) {
  using S = Storage<DT>;
  const WindowAttentionParams& p = b.fwd;
  const int32_t n = p.tokens, dk = p.dim_k, dv = p.dim_v;
  const int32_t ldn = round_up(n, J), ldk = round_up(dk, J), ldv = round_up(dv, J), n_pad = round_up(n, kR);
  const int32_t blk = backward_block_rows(n, (static_cast<size_t>(2) * ldn + ldk) * sizeof(Acc));
  const int32_t rows_alloc = round_up(n, blk);
  const Acc scale = static_cast<Acc>(p.scale);
  const std::vector<Acc> tbias = table_bias<Acc>(p);
  MaskValues<Acc> masks(p);
  HeadTiles<Acc, DT> t;
  std::vector<Acc> q, k, kt, vt, o, dout, dk_acc, dv_acc;
  std::vector<Acc> s(static_cast<size_t>(blk) * ldn), dp(static_cast<size_t>(blk) * ldn),
      dq(static_cast<size_t>(blk) * ldk);
  Acc* dbias = static_cast<Acc*>(b.dbias);
  auto* grad = static_cast<typename S::T*>(b.grad_qkv);
  const Strides3& gs = b.grad_qkv_strides;
  for (int64_t w = w_begin; w < w_end; ++w) {
    for (int32_t h = 0; h < p.heads; ++h) {
      t.rows(p, p.qkv, p.qkv_strides, w, p.q_off + h * p.head_stride, dk, ldk, rows_alloc, q);
      t.rows(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, ldk, n, k);
      t.cols(p, p.qkv, p.qkv_strides, w, p.k_off + h * p.head_stride, dk, ldn, kt);
      t.cols(p, p.qkv, p.qkv_strides, w, p.v_off + h * p.head_stride, dv, ldn, vt);
      t.rows(p, p.out, p.out_strides, w, h * dv, dv, dv, n, o);
      t.rows(p, b.grad_out, p.out_strides, w, h * dv, dv, ldv, rows_alloc, dout);
      t.gather_bias(p, tbias, masks.window(w), h);
      dk_acc.assign(static_cast<size_t>(n_pad) * ldk, Acc(0));
      dv_acc.assign(static_cast<size_t>(n_pad) * ldv, Acc(0));
      const Acc* lse = static_cast<const Acc*>(p.lse) + (w * p.heads + h) * n;
      for (int32_t i0 = 0; i0 < n; i0 += blk) {
        const int32_t rows = std::min(blk, n - i0);
        const Acc* qi = &q[static_cast<size_t>(i0) * ldk];
        const Acc* doi = &dout[static_cast<size_t>(i0) * ldv];
        for (int32_t r0 = 0; r0 < blk; r0 += kR) {
          const size_t o_s = static_cast<size_t>(r0) * ldn;
          gemm_rows<J>(qi + static_cast<size_t>(r0) * ldk, ldk, kt.data(), ldn, dk, &s[o_s]);   // S = Q K^T
          gemm_rows<J>(doi + static_cast<size_t>(r0) * ldv, ldv, vt.data(), ldn, dv, &dp[o_s]);  // dP = dO V^T
        }
        for (int32_t r = 0; r < blk; ++r) {
          Acc* sr = &s[static_cast<size_t>(r) * ldn];
          Acc* dpr = &dp[static_cast<size_t>(r) * ldn];
          if (r >= rows) {  // padding rows contribute nothing
            std::fill(sr, sr + ldn, Acc(0));
            std::fill(dpr, dpr + ldn, Acc(0));
            continue;
          }
          const Acc* dor = doi + static_cast<size_t>(r) * ldv;
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
        for (int32_t r0 = 0; r0 < blk; r0 += kR)  // dQ = dS K
          gemm_rows<J>(&dp[static_cast<size_t>(r0) * ldn], ldn, k.data(), ldk, n, &dq[static_cast<size_t>(r0) * ldk]);
        add_gemm_tn<J>(dp.data(), ldn, qi, ldk, blk, n, ldk, dk_acc.data());   // dK += dS^T Q
        add_gemm_tn<J>(s.data(), ldn, doi, ldv, blk, n, ldv, dv_acc.data());   // dV += P^T dO
        for (int32_t r = 0; r < rows; ++r) {
          typename S::T* dst = grad + token_offset(p.grid, gs.img, gs.y, gs.x, w, i0 + r) + p.q_off + h * p.head_stride;
          for (int32_t c = 0; c < dk; ++c) dst[c] = S::store(scale * dq[static_cast<size_t>(r) * ldk + c]);
        }
      }
      for (int32_t j = 0; j < n; ++j) {
        typename S::T* row = grad + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + h * p.head_stride;
        for (int32_t c = 0; c < dk; ++c) row[p.k_off + c] = S::store(scale * dk_acc[static_cast<size_t>(j) * ldk + c]);
        for (int32_t c = 0; c < dv; ++c) row[p.v_off + c] = S::store(dv_acc[static_cast<size_t>(j) * ldv + c]);
      }
    }
  }
}

VF_ISA_KERNEL(forward_range, forward_body, WindowAttentionParams)
VF_ISA_KERNEL(backward_range, backward_body, WindowAttentionBackwardParams)

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

void window_attention_forward_cpu(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end) {
  with_storage(p.dtype, [&](auto dt) { forward_range<AccOf<dt.value>, dt.value>(p, w_begin, w_end); });
}

void window_attention_backward_cpu(const WindowAttentionBackwardParams& p, int64_t w_begin, int64_t w_end) {
  with_storage(p.fwd.dtype, [&](auto dt) { backward_range<AccOf<dt.value>, dt.value>(p, w_begin, w_end); });
}

}  // namespace vitfast
