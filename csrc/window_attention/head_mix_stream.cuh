// Head-mixing (talking-heads) attention forward for windows of any length -- DeiT / CaiT sequences
// (N = 197, 577, ...), Mini-Swin's later stages (6 to 16 heads) -- in fp16/bf16 with head dims <=
// 64: a register-resident kernel that streams the keys in tiles of 16. Included by the 16-bit
// head_mix_fwd_<dtype>_cuda.cu units (through head_mix_dtype.cuh) only.
//
// Why: the shared-memory-tile forward (head_mix_fwd.cuh) measured 1.80 ms at DeiT-S (B128 H6 N197
// d64) against 0.089 ms for SDPA without the mixes and 1.38 ms for eager talking heads
// (benchmarks/RESULTS.md), and the register kernels of head_mix_reg.cuh hold a whole row of every
// head, which only fits 64 keys and 3-4 heads.
//
// Structure: a block of 4 warps takes 64 query rows of one window (warp w: rows 16w..16w+15, every
// head), q of those rows in shared memory; key tiles (16 keys, every head) stream through two
// shared-memory buffers filled with cp.async while the previous tile is in use. A warp's score
// tiles of every head share one mma.sync fragment layout, so the pre mix is per-lane arithmetic, as
// in head_mix_reg.cuh. The post mix needs each head's *final* softmax normaliser, so:
//   pass 1 (over all key tiles): per lane, running max and sum of every mixed head's scores;
//     combined over the quad at the end into lse_g (written out: the backward reads it);
//   pass 2, once per group of output heads: recompute the scores and the pre mix, P_h =
//     exp(S'_h - lse_h) for every head, P'_g for the group's heads, and O_g += P'_g V_g with O in
//     registers. Value tiles of the group's heads stream beside the key tiles.
// Registers bound the group: O and P' of all heads would not fit beside the scores of all heads,
// so each group repeats the score products (1 + groups products of Q K^T in all; group sizes in
// head_mix_stream_rule.h). The rows' lse and the mixing weights are read from shared memory where
// used, so that only the scores, O and P' hold registers through a step. The table bias and the mask enter as the per-call mixed bias of
// head_mix_reg.cuh (M_g = sum_h pre[g, h] table_h + mask, types x heads x N x N), read per score.
#pragma once

#include <type_traits>

#include "../common/cp_async.cuh"
#include "head_mix_reg.cuh"
#include "head_mix_split_fwd_entry.h"
#include "head_mix_stream_rule.h"

namespace vitfast {
namespace {

constexpr int kMixStreamThreads = kMixStreamWarps * 32;

// A role's 16-bit rows in global memory: head h of token t at base + token_offset(t, st) + off +
// h * head_stride + [0, dim). q, k, v: qkv with qkv_strides; dO (the backward): grad_out with
// out_strides, head stride dim_v.
template <typename T>
struct MixRows {
  const T* base;
  Strides3 st;
  int off, dim;
  int64_t head_stride;
};

template <typename T>
__device__ __forceinline__ MixRows<T> mix_qkv_rows(const WindowAttentionParams& p, int off, int dim) {
  return MixRows<T>{static_cast<const T*>(p.qkv), p.qkv_strides, off, dim, p.head_stride};
}

// `rows` rows of `heads` heads (head h0 + hh, hh < heads) of one role into shared memory (pitch
// D + 8, one rows x (D + 8) tile per head), tokens row0.. of window w; zero beyond the tokens,
// beyond `dim` and for heads >= kH. kVec: 16-byte cp.async copies (dim % 8 == 0, aligned rows);
// else element loads and plain stores (visible after the caller's barrier, like the copies).
// kThreads: the block's threads, which share the copies.
template <typename T, int kH, int D, bool kVec, int kThreads = kMixStreamThreads>
__device__ __forceinline__ void mix_stream_issue(const WindowAttentionParams& p, const MixRows<T>& src_rows, int64_t w,
                                                 T* dst, int h0, int heads, int row0, int rows) {
  constexpr int ld = D + 8, kPerRow = D / 8;
  const Strides3& st = src_rows.st;
  const T* base = src_rows.base;
  const int dim = src_rows.dim;
  const int per_head = rows * kPerRow, total = heads * per_head;
  for (int e = threadIdx.x; e < total; e += kThreads) {
    const int hh = e / per_head, r = (e - hh * per_head) / kPerRow, c = (e % kPerRow) * 8;
    const int token = row0 + r, head = h0 + hh;
    const bool row_ok = token < p.tokens && head < kH;
    T* d = dst + (hh * rows + r) * ld + c;
    const T* src = row_ok ? base + token_offset(p.grid, st.img, st.y, st.x, w, token) + src_rows.off +
                                static_cast<int64_t>(head) * src_rows.head_stride + c
                          : base;
    if constexpr (kVec) {
      cp_async_16(d, src, row_ok && c < dim);
    } else {
#pragma unroll
      for (int u = 0; u < 8; ++u) d[u] = row_ok && c + u < dim ? src[u] : wa::zero<T>();
    }
  }
}

// (The backward kernels' products, head_mix_stream_bwd.cuh and head_mix_split_*.cuh.)
// raw_h = a_h b_h^T for the warp's 16 rows of `a` (resident rows, 64 per head, from row `a_row`)
// against one streamed 16-row tile `b` of every head: C fragments of two n8 halves per head.
template <typename T, int kH, int D>
__device__ __forceinline__ void mix_stream_products(const T* a, int a_row, const T* b, int lane,
                                                    float (&out)[kH][2][4]) {
  constexpr int ld = D + 8, kTile = kMixStreamKeys * ld;
#pragma unroll
  for (int h = 0; h < kH; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[h][0][e] = out[h][1][e] = 0.0f;
#pragma unroll
    for (int k0 = 0; k0 < D; k0 += 16) {
      uint32_t af[4], bf[4];
      mma::ldmatrix_x4(af, a + (h * kMixStreamRows + a_row + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
      mma::ldmatrix_x4(bf, b + h * kTile + ((lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma::mma_16816<T>(out[h][0], af, b0);
      mma::mma_16816<T>(out[h][1], af, b1);
    }
  }
}

// The same products for one 8-key half j of the tile only (12 heads: mix_stream_bwd_halves): one
// ldmatrix.x4 gives the half's B fragments of two 16-channel steps.
template <typename T, int kH, int D>
__device__ __forceinline__ void mix_stream_products_half(const T* a, int a_row, const T* b, int lane, int j,
                                                         float (&out)[kH][4]) {
  constexpr int ld = D + 8, kTile = kMixStreamKeys * ld;
#pragma unroll
  for (int h = 0; h < kH; ++h) {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[h][e] = 0.0f;
#pragma unroll
    for (int k0 = 0; k0 < D; k0 += 32) {
      uint32_t bf[4];
      mma::ldmatrix_x4(bf, b + h * kTile + (8 * j + (lane & 7)) * ld + k0 + (lane >> 3) * 8);
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t af[4];
        mma::ldmatrix_x4(af, a + (h * kMixStreamRows + a_row + (lane & 15)) * ld + k0 + 16 * kk + (lane >> 4) * 8);
        const uint32_t bb[2] = {bf[2 * kk], bf[2 * kk + 1]};
        mma::mma_16816<T>(out[h], af, bb);
      }
    }
  }
}

// Opens step s of a streaming pass: issues step s + 1 into the other buffer (free since the barrier
// that closed step s - 1), waits for step s's copies, and makes everyone's visible.
// Window w's block of the per-call mixed bias (its mask type's, types x heads x N x N floats), or
// null without a table and a mask.
template <int kH>
__device__ __forceinline__ const float* mix_stream_window_bias(const float* mixed_bias, const WindowAttentionParams& p,
                                                               int64_t w) {
  if (mixed_bias == nullptr) return nullptr;
  return mixed_bias + (p.mask != nullptr ? w % p.mask_windows : 0) * mix_reg_bias_block(kH, p.tokens);
}

template <typename Issue>
__device__ __forceinline__ void mix_stream_begin_step(Issue&& issue, int s, int steps) {
  if (s + 1 < steps) {
    issue(s + 1);
    cp_async_commit();
    cp_async_wait_prior<1>();
  } else {
    cp_async_wait_all();
  }
  __syncthreads();
}

template <typename T, int kH, int D, bool kVec>
__global__ void __launch_bounds__(kMixStreamThreads, 1)
    head_mix_fwd_stream_kernel(const WindowAttentionParams p, const float* mixed_bias) {
  constexpr int kGh = mix_stream_group(kH, D), kGroups = (kH + kGh - 1) / kGh;
  constexpr int ld = D + 8, kTile = kMixStreamKeys * ld, kW = 2 * kH * kH + kH;
  VF_DYNAMIC_SMEM(smem_raw);
  const MixStreamLayout L = mix_stream_layout(kH, D);
  T* q = reinterpret_cast<T*>(smem_raw + L.q);
  float* mw = reinterpret_cast<float*>(smem_raw + L.weights);  // [pre * scale | post | post_bias]
  // A mixing weight, read where it is used. With 8+ heads the reads are volatile: otherwise the
  // compiler keeps all H^2 weights of the unrolled entry loop in registers (144 at 12 heads) and
  // spills the score tiles; a broadcast shared-memory load per multiply-add costs less.
  auto weight = [&](int e) -> float {
    if constexpr (kH >= 8) return *static_cast<const volatile float*>(mw + e);
    else return mw[e];
  };
  const int N = p.tokens;
  const int chunks = (N + kMixStreamRows - 1) / kMixStreamRows, tiles = (N + kMixStreamKeys - 1) / kMixStreamKeys;
  const int64_t w = blockIdx.x / chunks;
  const int row0 = static_cast<int>(blockIdx.x % chunks) * kMixStreamRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int steps = (1 + kGroups) * tiles;  // pass 1's tiles, then each group's

  // step s: key tile s % tiles of every head (and, in pass 2, the value tile of group s / tiles - 1)
  auto issue = [&](int s) {
    const int phase = s / tiles, kt = s - phase * tiles, b = s & 1;
    mix_stream_issue<T, kH, D, kVec>(p, mix_qkv_rows<T>(p, p.k_off, p.dim_k), w,
                                     reinterpret_cast<T*>(smem_raw + L.k + b * L.k_buffer), 0, kH, kt * kMixStreamKeys,
                                     kMixStreamKeys);
    if (phase > 0)
      mix_stream_issue<T, kH, D, kVec>(p, mix_qkv_rows<T>(p, p.v_off, p.dim_v), w,
                                       reinterpret_cast<T*>(smem_raw + L.v + b * L.v_buffer), (phase - 1) * kGh, kGh,
                                       kt * kMixStreamKeys, kMixStreamKeys);
  };
  mix_stream_issue<T, kH, D, kVec>(p, mix_qkv_rows<T>(p, p.q_off, p.dim_k), w, q, 0, kH, row0, kMixStreamRows);
  issue(0);
  cp_async_commit();
  for (int e = threadIdx.x; e < kW; e += kMixStreamThreads)
    mw[e] = MixRegWeights<kH>::mix_weight(p, static_cast<float>(p.scale), e);

  const int q0 = row0 + warp * 16;
  const bool active = q0 < N;  // idle warps still load tiles and meet the barriers
  const int rows[2] = {q0 + g, q0 + g + 8};
  const int64_t nn = static_cast<int64_t>(N) * N;
  const float* mb = mix_stream_window_bias<kH>(mixed_bias, p, w);

  auto begin_step = [&](int s) { mix_stream_begin_step(issue, s, steps); };

  // Mixed scores of key tile kt (buffer b), every head, the warp's 16 rows: raw q_h k_h^T through
  // mma.sync, then S'_g = sum_h (scale pre[g, h]) raw_h + M_g per lane entry; keys past N are -inf.
  auto mixed_scores = [&](int kt, int b, float (&sc)[kH][2][4]) {
    const T* kb = reinterpret_cast<const T*>(smem_raw + L.k + b * L.k_buffer);
#pragma unroll
    for (int h = 0; h < kH; ++h) {
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[h][0][e] = sc[h][1][e] = 0.0f;
#pragma unroll
      for (int k0 = 0; k0 < D; k0 += 16) {
        uint32_t a[4], bb[4];
        mma::ldmatrix_x4(a, q + (h * kMixStreamRows + warp * 16 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
        mma::ldmatrix_x4(bb, kb + h * kTile + ((lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
        mma::mma_16816<T>(sc[h][0], a, b0);
        mma::mma_16816<T>(sc[h][1], a, b1);
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = rows[e >> 1], c = kt * kMixStreamKeys + 8 * j + 2 * t + (e & 1);
        const bool key = c < N;
        float a[kH];
#pragma unroll
        for (int h = 0; h < kH; ++h) a[h] = sc[h][j][e];
#pragma unroll
        for (int gg = 0; gg < kH; ++gg) {
          float x = mb != nullptr && key && i < N ? __ldg(mb + gg * nn + static_cast<int64_t>(i) * N + c) : 0.0f;
#pragma unroll
          for (int h = 0; h < kH; ++h) x += weight(gg * kH + h) * a[h];
          sc[gg][j][e] = key ? x : wa::neg_inf<float>();
        }
      }
    }
  };

  // The rows' lse per (row, head) in shared memory, each warp its own 16 rows: read where used in
  // pass 2 (as registers, 2 x heads of them would stay live through every step).
  float* lse_rows = reinterpret_cast<float*>(smem_raw + L.lse) + warp * 16 * kH;
  auto lse_at = [&](int h, int r) -> float { return *static_cast<const volatile float*>(lse_rows + (g + 8 * r) * kH + h); };
  // Pass 1: per lane, the running max and sum of each row's entries (rescaled when the max grows);
  // then the quad's four lanes (a row's keys) combine into lse_g = max + log(sum), written out for
  // the backward and to lse_rows for pass 2.
  {
    float m[kH][2], l[kH][2];
#pragma unroll
    for (int h = 0; h < kH; ++h) m[h][0] = m[h][1] = wa::neg_inf<float>(), l[h][0] = l[h][1] = 0.0f;
    for (int kt = 0; kt < tiles; ++kt) {
      begin_step(kt);
      if (active) {
        float sc[kH][2][4];
        mixed_scores(kt, kt & 1, sc);
#pragma unroll
        for (int gg = 0; gg < kH; ++gg) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float tile_max = max(max(sc[gg][0][2 * r], sc[gg][0][2 * r + 1]), max(sc[gg][1][2 * r], sc[gg][1][2 * r + 1]));
            const float mnew = max(m[gg][r], tile_max);
            if (mnew == wa::neg_inf<float>()) continue;  // nothing but padding (or -inf) so far
            float acc = l[gg][r] * wa::acc_exp(m[gg][r] - mnew);
#pragma unroll
            for (int j = 0; j < 2; ++j)
              acc += wa::acc_exp(sc[gg][j][2 * r] - mnew) + wa::acc_exp(sc[gg][j][2 * r + 1] - mnew);
            l[gg][r] = acc;
            m[gg][r] = mnew;
          }
        }
      }
      __syncthreads();  // buffer kt & 1 is refilled by the issue of step kt + 2
    }
    if (active) {
#pragma unroll
      for (int gg = 0; gg < kH; ++gg) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          float mq = max(m[gg][r], __shfl_xor_sync(0xffffffffu, m[gg][r], 1));
          mq = max(mq, __shfl_xor_sync(0xffffffffu, mq, 2));
          float part = m[gg][r] == wa::neg_inf<float>() ? 0.0f : l[gg][r] * wa::acc_exp(m[gg][r] - mq);
          part += __shfl_xor_sync(0xffffffffu, part, 1);
          part += __shfl_xor_sync(0xffffffffu, part, 2);
          const float lse = mq + wa::acc_log(part);  // -inf for a row without a finite score
          if (t == 0) {
            lse_rows[(g + 8 * r) * kH + gg] = lse;  // seen by the warp after the next barrier
            if (rows[r] < N) static_cast<float*>(p.lse)[(w * kH + gg) * N + rows[r]] = lse;
          }
        }
      }
    }
  }

  // Pass 2, one group of output heads at a time: P_h = exp(S'_h - lse_h) of every head, P'_g =
  // sum_h post[g, h] P_h + post_bias[g] of the group's heads on the real keys (zero on the
  // padding), O_g += P'_g V_g in registers.
  const Strides3& os = p.out_strides;
  for (int c0 = 0, step = tiles; c0 < kH; c0 += kGh) {
    float o[kGh][D / 8][4];
#pragma unroll
    for (int gi = 0; gi < kGh; ++gi) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) o[gi][n][0] = o[gi][n][1] = o[gi][n][2] = o[gi][n][3] = 0.0f;
    }
    for (int kt = 0; kt < tiles; ++kt, ++step) {
      begin_step(step);
      if (active) {
        float sc[kH][2][4];
        mixed_scores(kt, step & 1, sc);
        float pp[kGh][2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const bool key = kt * kMixStreamKeys + 8 * j + 2 * t + (e & 1) < N;
            float a[kH];
#pragma unroll
            for (int h = 0; h < kH; ++h) a[h] = key ? wa::acc_exp(sc[h][j][e] - lse_at(h, e >> 1)) : 0.0f;
#pragma unroll
            for (int gi = 0; gi < kGh; ++gi) {
              const int gg = c0 + gi;
              float x = 0.0f;
              if (gg < kH) {
                x = weight(2 * kH * kH + gg);
#pragma unroll
                for (int h = 0; h < kH; ++h) x += weight(kH * kH + gg * kH + h) * a[h];
              }
              pp[gi][j][e] = key ? x : 0.0f;
            }
          }
        }
        const T* vb = reinterpret_cast<const T*>(smem_raw + L.v + (step & 1) * L.v_buffer);
#pragma unroll
        for (int gi = 0; gi < kGh; ++gi) {
          uint32_t a[4];
          c_tiles_to_a<T>(pp[gi][0], pp[gi][1], a);
          mma_times_rows<T, D>(o[gi], a, vb + gi * kTile, ld, lane);
        }
      }
      __syncthreads();  // buffer step & 1 is refilled by the issue of step + 2
    }
    if (active) {
#pragma unroll
      for (int gi = 0; gi < kGh; ++gi) {
        const int gg = c0 + gi;
        if (gg >= kH) continue;
        store_rows<T, D, kVec>(o[gi], 1.0f, q0, N, p.dim_v, [&](int i) {
          return static_cast<T*>(p.out) + token_offset(p.grid, os.img, os.y, os.x, w, i) + gg * p.dim_v;
        });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename F>
auto with_mix_stream_heads(int heads, F&& f) {
  switch (heads) {
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 8: return f(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 12>{});  // 16 and 24 heads: head_mix_split_fwd.cuh
  }
}

// The forward's mixed bias (table and mask pre-mixed, types x heads x N x N floats) filled into the
// workspace; null without a table and a mask. Shared with the head-split forward.
template <int kH>
const float* mix_stream_fill_bias(const WindowAttentionParams& p, float* workspace, cudaStream_t stream) {
  if (mix_stream_bias_floats(p) == 0) return nullptr;
  auto fill = head_mix_reg_bias_kernel<kH>;
  VF_LAUNCH(fill, blocks_for(mix_stream_bias_floats(p), 256), 256, 0, stream, p, workspace);
  return workspace;
}

template <typename T, int kH, int D>
int mix_stream_forward(const WindowAttentionParams& p, float* workspace, cudaStream_t stream) {
  const float* mixed_bias = mix_stream_fill_bias<kH>(p, workspace, stream);
  auto kernel = vec_ok<T>(p, nullptr) ? head_mix_fwd_stream_kernel<T, kH, D, true>
                                      : head_mix_fwd_stream_kernel<T, kH, D, false>;
  const size_t smem = mix_stream_layout(kH, D).total;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t chunks = (p.tokens + kMixStreamRows - 1) / kMixStreamRows;
  VF_LAUNCH(kernel, static_cast<unsigned>(p.windows * chunks), kMixStreamThreads, smem, stream, p, mixed_bias);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
bool mix_stream_try_forward_workspace(const WindowAttentionParams& p, int64_t* elements) {
  if constexpr (sizeof(T) == 2) {
    if (!mix_stream_route_ok(p)) return false;
    *elements = mix_stream_bias_floats(p);
    return true;
  }
  return false;
}

// the head-split forward's unit (head_mix_split_fwd_<dtype>_cuda.cu)
template <typename T>
int mix_split_forward_launch(const WindowAttentionParams& p, float* mixed_bias, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __half>) return head_mix_split_fwd_launch_f16(p, mixed_bias, stream);
  else return head_mix_split_fwd_launch_bf16(p, mixed_bias, stream);
}

template <typename T>
bool mix_stream_try_forward(const WindowAttentionParams& p, void* workspace, cudaStream_t stream, int* err) {
  if constexpr (sizeof(T) == 2) {
    if (!mix_stream_route_ok(p)) return false;
    if (mix_split_fwd_runs(p.heads, mix_stream_dim(p.dim_k, p.dim_v))) {
      *err = mix_split_forward_launch<T>(p, static_cast<float*>(workspace), stream);
      return true;
    }
    *err = with_mix_stream_heads(p.heads, [&](auto h) {
      constexpr int kH = decltype(h)::value;
      float* bias = static_cast<float*>(workspace);
      return mix_stream_dim(p.dim_k, p.dim_v) == 32 ? mix_stream_forward<T, kH, 32>(p, bias, stream)
                                                    : mix_stream_forward<T, kH, 64>(p, bias, stream);
    });
    return true;
  }
  return false;
}

}  // namespace
}  // namespace vitfast
