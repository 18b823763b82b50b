// Head-mixing (talking-heads) attention for windows of at most 64 tokens, 3 or 4 heads of at most
// 32 channels, fp16/bf16: register-resident kernels on the pattern of window_attention_reg.cuh.
// This is Mini-Swin's first stage (8192 windows of 7 x 7, 3 heads of 32 at batch 128), where the
// shared-memory-tile kernels (head_mix_fwd/bwd.cuh) measured 13.0 ms forward+backward on the H100
// against 7.8 ms for plain window attention (benchmarks/RESULTS.md). Included by the 16-bit
// head_mix_{fwd,bwd}_<dtype>_cuda.cu units (through head_mix_dtype.cuh) only.
//
// Why registers work here: with every key of a window in one pass, the per-head score tiles of a
// warp (16 query rows x 64 keys, C fragments of mma.sync m16n8k16) all share one fragment layout,
// so a lane holds the same (row, key) entries of every head. Both mixes -- S'_g = sum_h pre[g, h]
// S_h and P'_g = sum_h post[g, h] P_h -- are then per-lane combinations of registers: no shared
// memory round trip, no second pass over the keys (the softmax sees each whole row at once).
//
// Forward: one 4-warp block per window; warp w owns query rows 16w..16w+15 of every head. The table
// bias enters through a per-call "mixed bias" M_g = sum_h pre[g, h] table_h + mask (window types x
// heads x N x N, built by head_mix_reg_bias_kernel), so S'_g = sum_h (scale pre[g, h]) q_h k_h^T +
// M_g. Then the row softmax per mixed head, P' per lane, out_g = P'_g V_g one head at a time.
//
// Backward: one block per window slot (one wave of resident blocks; blocks loop over windows);
// warp w owns keys 16w..16w+15 of every head and recomputes S^T and dP'^T = V dO^T in registers per
// 16-query tile. D_h = rowsum(P_h * dP_h) with dP_h = sum_g post[g, h] dP'_g is *not* dO . O (the
// post mix sits between), so a first pass over the query tiles sums it per warp (shared-memory
// partials, added in warp order); the second pass forms dS'_g = P_g (dP_g - D_g), dS_h = sum_g
// pre[g, h] dS'_g, accumulates dV_g += P'^T_g dO_g and dK_h += dS^T_h Q_h in registers, leaves
// dS^T_h in shared memory for dQ (after a barrier each warp computes dQ of 16 query rows, as in
// window_attention_reg.cuh: complete, no atomics), and adds the table gradient (dS_h, per lane
// in shared memory) and the mixing gradients (per thread, in registers). The block's sums leave
// once per slot and are added over slots in slot order: bitwise reproducible.
#pragma once

#include <type_traits>

#include "../common/cp_async.cuh"
#include "head_mix_common.cuh"
#include "head_mix_reg_rule.h"
#include "window_attention_reg.cuh"

namespace vitfast {
namespace {

constexpr int kMixRegTile = kMixRegTokens * kMixRegLd;  // elements of one head's q (k, v, dO) tile
constexpr int kMixRegThreads = kMixRegWarps * 32;

// n floats from src to dst (both 16-byte aligned): 16-byte loads in batches of 8 per thread, each
// batch's loads all in flight before its stores.
__device__ __forceinline__ void mix_reg_copy(float* dst, const float* src, int n) {
  constexpr int kBatch = 8;
  const int n4 = n / 4;
  const float4* s4 = reinterpret_cast<const float4*>(src);
  float4* d4 = reinterpret_cast<float4*>(dst);
  for (int base = 0; base < n4; base += kBatch * kMixRegThreads) {
    float4 v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = base + u * kMixRegThreads + static_cast<int>(threadIdx.x);
      v[u] = e < n4 ? __ldg(s4 + e) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = base + u * kMixRegThreads + static_cast<int>(threadIdx.x);
      if (e < n4) d4[e] = v[u];
    }
  }
  for (int e = 4 * n4 + static_cast<int>(threadIdx.x); e < n; e += kMixRegThreads) dst[e] = __ldg(src + e);
}

// One window's per-window inputs in shared memory: q, k, v, dO tiles of every head (pitch
// kMixRegLd) and, in the backward, its mask (N x N) and the mixed scores' lse (kH x 64).
template <typename T>
struct MixRegBuf {
  T *q, *k, *v, *dout;
  float *mask, *lse;
};

// The tile sources of every head (q, k, v and, with kGradOut, dO) as RegRoles: head h's channels
// pre-added to the offsets, so the loaders address them as head 0.
template <typename T, int kH, bool kGradOut>
__device__ __forceinline__ void mix_reg_roles(const WindowAttentionParams& p, const void* grad_out,
                                              const MixRegBuf<T>& buf, RegRole (&roles)[(kGradOut ? 4 : 3) * kH]) {
#pragma unroll
  for (int h = 0; h < kH; ++h) {
    const int hs = h * p.head_stride;
    roles[h] = {p.qkv, p.qkv_strides, p.q_off + hs, p.head_stride, p.dim_k, buf.q + h * kMixRegTile};
    roles[kH + h] = {p.qkv, p.qkv_strides, p.k_off + hs, p.head_stride, p.dim_k, buf.k + h * kMixRegTile};
    roles[2 * kH + h] = {p.qkv, p.qkv_strides, p.v_off + hs, p.head_stride, p.dim_v, buf.v + h * kMixRegTile};
    if constexpr (kGradOut)
      roles[3 * kH + h] = {grad_out, p.out_strides, h * p.dim_v, p.dim_v, p.dim_v, buf.dout + h * kMixRegTile};
  }
}

// q, k, v (and dO) tiles of every head of window w into shared memory (pitch kMixRegLd), zero
// beyond the tokens and the head dims.
template <typename T, int kH, bool kVec, bool kGradOut>
__device__ __forceinline__ void mix_reg_load_tiles(const WindowAttentionParams& p, const void* grad_out, int64_t w,
                                                   const MixRegBuf<T>& buf) {
  if constexpr (kVec) {
    constexpr int kRoles = (kGradOut ? 4 : 3) * kH;
    RegRole roles[kRoles];
    mix_reg_roles<T, kH, kGradOut>(p, grad_out, buf, roles);
    load_roles_vec<T, kMixRegD, kRoles>(p, w, 0, roles);
  } else {  // the pad columns were zeroed once; these loads write [0, round16(dim)) of every row
    load_qkv_tile<T, false>(p, w, 0, kH, p.q_off, p.dim_k, 0, kMixRegTokens, buf.q, kMixRegLd, kMixRegTile);
    load_qkv_tile<T, false>(p, w, 0, kH, p.k_off, p.dim_k, 0, kMixRegTokens, buf.k, kMixRegLd, kMixRegTile);
    load_qkv_tile<T, false>(p, w, 0, kH, p.v_off, p.dim_v, 0, kMixRegTokens, buf.v, kMixRegLd, kMixRegTile);
    if constexpr (kGradOut)
      load_tile<T, false>(p, grad_out, p.out_strides, w, 0, kH, 0, p.dim_v, p.dim_v, 0, kMixRegTokens, buf.dout,
                          kMixRegLd, kMixRegTile);
  }
}

// The pipelined backward's loads of window w into `buf` with cp.async (16-byte tile chunks, zeros
// beyond the tokens and head dims; the float32 mask and the lse in 4-byte copies), one commit
// group; the caller waits (cp_async_wait_all + barrier) before reading them.
template <typename T, int kH>
__device__ __forceinline__ void mix_reg_issue_window(const WindowAttentionParams& p, const void* grad_out, int64_t w,
                                                     const MixRegBuf<T>& buf) {
  constexpr int kPerRow = kMixRegD / 8, kChunks = kMixRegTokens * kPerRow;
  const int N = p.tokens, nn = N * N;
  RegRole roles[4 * kH];
  mix_reg_roles<T, kH, true>(p, grad_out, buf, roles);
#pragma unroll
  for (int r = 0; r < 4 * kH; ++r) {
    const Strides3& st = roles[r].strides;
    for (int e = threadIdx.x; e < kChunks; e += kMixRegThreads) {
      const int row = e / kPerRow, c = (e % kPerRow) * 8;
      const bool valid = row < N && c < roles[r].dim;
      const T* src = static_cast<const T*>(roles[r].src) +
                     (valid ? token_offset(p.grid, st.img, st.y, st.x, w, row) + roles[r].off + c : 0);
      cp_async_16(static_cast<T*>(roles[r].dst) + row * kMixRegLd + c, src, valid);
    }
  }
  if (p.mask != nullptr) {
    const float* m = static_cast<const float*>(p.mask) + (w % p.mask_windows) * nn;
    for (int e = threadIdx.x; e < nn; e += kMixRegThreads) cp_async_4(buf.mask + e, m + e, true);
  }
  const float* lse = static_cast<const float*>(p.lse);
  for (int e = threadIdx.x; e < kH * kMixRegTokens; e += kMixRegThreads) {
    const int h = e / kMixRegTokens, i = e - h * kMixRegTokens;
    cp_async_4(buf.lse + e, lse + (i < N ? (w * kH + h) * N + i : 0), i < N);
  }
  cp_async_commit();
}

template <typename T, int kH>
__device__ void mix_reg_zero_pads(T* tiles, int dim) {
#pragma unroll
  for (int h = 0; h < kH; ++h) zero_pad_columns<T, kMixRegD>(tiles + h * kMixRegTile, dim);
}

// The mixing parameters -- pre (times `pre_scale`), post, post_bias -- in registers, each thread
// loading its own copy (init's `smem` unused).
template <int kH>
struct MixRegWeights {
  float w[2 * kH * kH + kH];

  __device__ __forceinline__ void init(const WindowAttentionParams& p, float pre_scale, float*) {
#pragma unroll
    for (int e = 0; e < 2 * kH * kH + kH; ++e) w[e] = mix_weight(p, pre_scale, e);
  }
  __device__ __forceinline__ float pre(int g, int h) const { return w[g * kH + h]; }
  __device__ __forceinline__ float post(int g, int h) const { return w[kH * kH + g * kH + h]; }
  __device__ __forceinline__ float post_bias(int g) const { return w[2 * kH * kH + g]; }

  // [pre * pre_scale (kH x kH) | post (kH x kH) | post_bias (kH)], element e
  static __device__ __forceinline__ float mix_weight(const WindowAttentionParams& p, float pre_scale, int e) {
    if (e < kH * kH) return __ldg(static_cast<const float*>(p.pre_mix) + e) * pre_scale;
    if (e < 2 * kH * kH) return __ldg(static_cast<const float*>(p.post_mix) + e - kH * kH);
    return __ldg(static_cast<const float*>(p.post_mix_bias) + e - 2 * kH * kH);
  }
};

// The same in shared memory (read with broadcast loads): the 4-head backward, whose dK, dV and
// mixing-gradient registers leave no room for 36 more. init() needs a barrier before first use.
template <int kH>
struct MixRegWeightsShared {
  const float* w;

  __device__ __forceinline__ void init(const WindowAttentionParams& p, float pre_scale, float* smem) {
    for (int e = threadIdx.x; e < 2 * kH * kH + kH; e += blockDim.x)
      smem[e] = MixRegWeights<kH>::mix_weight(p, pre_scale, e);
    w = smem;
  }
  __device__ __forceinline__ float pre(int g, int h) const { return w[g * kH + h]; }
  __device__ __forceinline__ float post(int g, int h) const { return w[kH * kH + g * kH + h]; }
  __device__ __forceinline__ float post_bias(int g) const { return w[2 * kH * kH + g]; }
};

// ---------------------------------------------------------------------------------------------
// Forward

// M[type][g][i][j] = sum_h pre[g, h] table[h, index[i, j]] + mask[type, i, j], one block of
// mix_reg_bias_block floats per window type (the pre-mix bias cancels in the softmax).
template <int kH>
__global__ void head_mix_reg_bias_kernel(const WindowAttentionParams p, float* out) {
  const int N = p.tokens, nn = N * N;
  const int64_t block = mix_reg_bias_block(kH, N), types = p.mask != nullptr ? p.mask_windows : 1;
  WindowAttentionParams gather = p;
  gather.bias_buffer = nullptr;
  const float* pre = static_cast<const float*>(p.pre_mix);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < types * block;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t type = e / block;
    const int r = static_cast<int>(e - type * block);
    if (r >= kH * nn) {
      out[e] = 0.0f;
      continue;
    }
    const int g = r / nn, ij = r - g * nn, i = ij / N, j = ij - i * N;
    float v = mix_mask<float>(p, type, i, j);
#pragma unroll
    for (int h = 0; h < kH; ++h) v += pre[g * kH + h] * mix_table_bias<float>(gather, h, i, j);
    out[e] = v;
  }
}

template <typename T, int kH, bool kVec>
__global__ void __launch_bounds__(kMixRegThreads, kH <= 3 ? 3 : 2)
    head_mix_fwd_reg_kernel(const WindowAttentionParams p, const float* mixed_bias) {
  VF_DYNAMIC_SMEM(smem_raw);
  constexpr int ld = kMixRegLd;
  const int N = p.tokens, nn = N * N;
  const MixRegLayout L = mix_reg_layout(kH, N, false);
  T* q = reinterpret_cast<T*>(smem_raw + L.q);
  T* k = reinterpret_cast<T*>(smem_raw + L.k);
  T* v = reinterpret_cast<T*>(smem_raw + L.v);
  float* mb = reinterpret_cast<float*>(smem_raw + L.bias);
  const MixRegBuf<T> buf{q, k, v, nullptr, nullptr, nullptr};
  const int64_t w = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  if constexpr (!kVec) {
    mix_reg_zero_pads<T, kH>(q, p.dim_k);
    mix_reg_zero_pads<T, kH>(k, p.dim_k);
    mix_reg_zero_pads<T, kH>(v, p.dim_v);
  }
  mix_reg_load_tiles<T, kH, kVec, false>(p, nullptr, w, buf);
  const int64_t type = p.mask != nullptr ? w % p.mask_windows : 0;
  mix_reg_copy(mb, mixed_bias + type * mix_reg_bias_block(kH, N), kH * nn);
  MixRegWeights<kH> mw;
  mw.init(p, static_cast<float>(p.scale), nullptr);
  __syncthreads();

  const int q0 = warp * 16;
  if (q0 >= N) return;  // no barrier follows
  const int keys16 = round16(N);

  // raw scores q_h k_h^T of every head: 16 rows x 64 keys (eight n8 tiles) per head
  float s[kH][8][4];
#pragma unroll
  for (int h = 0; h < kH; ++h) {
#pragma unroll
    for (int j = 0; j < 8; ++j) s[h][j][0] = s[h][j][1] = s[h][j][2] = s[h][j][3] = 0.0f;
#pragma unroll
    for (int k0 = 0; k0 < kMixRegD; k0 += 16) {
      uint32_t a[4];
      mma::ldmatrix_x4(a, q + h * kMixRegTile + (q0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
#pragma unroll
      for (int n0 = 0; n0 < kMixRegTokens; n0 += 16) {
        if (n0 >= keys16) continue;
        uint32_t b[4];
        mma::ldmatrix_x4(b, k + h * kMixRegTile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
        mma::mma_16816<T>(s[h][n0 / 8], a, b0);
        mma::mma_16816<T>(s[h][n0 / 8 + 1], a, b1);
      }
    }
  }

  // S'_g = sum_h (scale pre[g, h]) raw_h + M_g per lane entry; keys past N are -inf
  const int rows[2] = {q0 + g, q0 + g + 8};
  float mx[kH][2];
#pragma unroll
  for (int h = 0; h < kH; ++h) mx[h][0] = mx[h][1] = wa::neg_inf<float>();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = rows[e >> 1], c = 8 * j + 2 * t + (e & 1);
      const bool key = c < N, in = key && i < N;
      float a[kH];
#pragma unroll
      for (int h = 0; h < kH; ++h) a[h] = s[h][j][e];
#pragma unroll
      for (int gg = 0; gg < kH; ++gg) {
        float x = in ? mb[gg * nn + i * N + c] : 0.0f;
#pragma unroll
        for (int h = 0; h < kH; ++h) x += mw.pre(gg, h) * a[h];
        s[gg][j][e] = key ? x : wa::neg_inf<float>();
        mx[gg][e >> 1] = max(mx[gg][e >> 1], s[gg][j][e]);
      }
    }
  }

  // row softmax of every mixed head (a row's 64 entries sit in the 4 lanes of a quad); P_g
  // normalised here, since the post mix adds heads with different normalisers. A fully masked
  // row gives l = 0 and NaN probabilities, as torch.softmax does.
  float sum[kH][2];
#pragma unroll
  for (int gg = 0; gg < kH; ++gg) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[gg][r] = max(mx[gg][r], __shfl_xor_sync(0xffffffffu, mx[gg][r], 1));
      mx[gg][r] = max(mx[gg][r], __shfl_xor_sync(0xffffffffu, mx[gg][r], 2));
      sum[gg][r] = 0.0f;
    }
    const float base[2] = {mx[gg][0] == wa::neg_inf<float>() ? 0.0f : mx[gg][0],
                           mx[gg][1] == wa::neg_inf<float>() ? 0.0f : mx[gg][1]};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[gg][j][e] = wa::acc_exp(s[gg][j][e] - base[e >> 1]);
        sum[gg][e >> 1] += s[gg][j][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      sum[gg][r] += __shfl_xor_sync(0xffffffffu, sum[gg][r], 1);
      sum[gg][r] += __shfl_xor_sync(0xffffffffu, sum[gg][r], 2);
    }
    const float inv[2] = {1.0f / sum[gg][0], 1.0f / sum[gg][1]};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[gg][j][e] *= inv[e >> 1];
    }
  }

  // P'_g = sum_h post[g, h] P_h + post_bias[g] on the real keys (zero on the padding)
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const bool key = 8 * j + 2 * t + (e & 1) < N;
      float a[kH];
#pragma unroll
      for (int h = 0; h < kH; ++h) a[h] = s[h][j][e];
#pragma unroll
      for (int gg = 0; gg < kH; ++gg) {
        float x = mw.post_bias(gg);
#pragma unroll
        for (int h = 0; h < kH; ++h) x += mw.post(gg, h) * a[h];
        s[gg][j][e] = key ? x : 0.0f;
      }
    }
  }

  // out_g = P'_g V_g, one head at a time; lse_g = m_g + log(l_g)
  const Strides3& os = p.out_strides;
#pragma unroll
  for (int gg = 0; gg < kH; ++gg) {
    float o[kMixRegD / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kMixRegTokens / 16; ++kk) {
      if (kk * 16 >= keys16) continue;
      uint32_t a[4];
      c_tiles_to_a<T>(s[gg][2 * kk], s[gg][2 * kk + 1], a);
      mma_times_rows<T, kMixRegD>(o, a, v + gg * kMixRegTile + kk * 16 * ld, ld, lane);
    }
    store_rows<T, kMixRegD, kVec>(o, 1.0f, q0, N, p.dim_v, [&](int i) {
      return static_cast<T*>(p.out) + token_offset(p.grid, os.img, os.y, os.x, w, i) + gg * p.dim_v;
    });
    if (t == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (rows[r] < N)
          static_cast<float*>(p.lse)[(w * kH + gg) * N + rows[r]] = mx[gg][r] + wa::acc_log(sum[gg][r]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward

// S^T_h = K_h Q_h^T (raw) and dP'^T_g = V_g dO_g^T for the warp's 16 keys (from j0) and queries
// 16I .. 16I+15 of every head. Lane entries: key j0 + g (+8 for e >= 2), query 16I + 8n + 2t (+1
// for odd e).
template <typename T, int kH>
__device__ __forceinline__ void mix_reg_products(const T* q, const T* k, const T* v, const T* dout, int j0, int I,
                                                 int lane, float (&st)[kH][2][4], float (&dpt)[kH][2][4]) {
  constexpr int ld = kMixRegLd;
#pragma unroll
  for (int h = 0; h < kH; ++h) {
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[h][n][e] = dpt[h][n][e] = 0.0f;
    }
#pragma unroll
    for (int kc = 0; kc < kMixRegD / 16; ++kc) {
      const int off = (I * 16 + (lane & 7) + (lane >> 4) * 8) * ld + kc * 16 + ((lane >> 3) & 1) * 8;
      const int own = (j0 + (lane & 15)) * ld + kc * 16 + (lane >> 4) * 8;
      uint32_t bq[4], bo[4], ka[4], va[4];
      mma::ldmatrix_x4(bq, q + h * kMixRegTile + off);
      mma::ldmatrix_x4(bo, dout + h * kMixRegTile + off);
      mma::ldmatrix_x4(ka, k + h * kMixRegTile + own);
      mma::ldmatrix_x4(va, v + h * kMixRegTile + own);
      const uint32_t q0[2] = {bq[0], bq[1]}, q1[2] = {bq[2], bq[3]};
      const uint32_t o0[2] = {bo[0], bo[1]}, o1[2] = {bo[2], bo[3]};
      mma::mma_16816<T>(st[h][0], ka, q0);
      mma::mma_16816<T>(st[h][1], ka, q1);
      mma::mma_16816<T>(dpt[h][0], va, o0);
      mma::mma_16816<T>(dpt[h][1], va, o1);
    }
  }
}

// What the backward's entries read of the current window: the table bias (kH x N x N), the mask
// (N x N) and the mixed scores' log-sum-exp (kH x 64), all in shared memory.
struct MixRegWindow {
  const float *tbl, *mask, *lse;
  int N, nn;
  float scale;
};

// Entry (n, e) of the warp's S^T / dP'^T tiles for query tile I (query i, key j) of every head:
// S_h (scores before the mix), P_g (mixed-score probabilities), dP'_g and dP_h = sum_g post[g, h]
// dP'_g. Everything is zero outside the window's N x N.
template <int kH>
struct MixRegEntry {
  int i, j;
  bool valid;
  float s[kH], p[kH], dpm[kH], dp[kH];

  template <typename W>
  __device__ __forceinline__ void compute(const W& mw, const MixRegWindow& win, int I, int j0,
                                          int lane, int n, int e, const float (&st)[kH][2][4],
                                          const float (&dpt)[kH][2][4]) {
    i = I * 16 + 8 * n + 2 * (lane & 3) + (e & 1);
    j = j0 + (lane >> 2) + 8 * (e >> 1);
    valid = i < win.N && j < win.N;
    const int ij = i * win.N + j;
#pragma unroll
    for (int h = 0; h < kH; ++h) {
      s[h] = valid ? win.scale * st[h][n][e] + win.tbl[h * win.nn + ij] : 0.0f;
      dpm[h] = valid ? dpt[h][n][e] : 0.0f;
    }
    const float m = valid ? win.mask[ij] : 0.0f;
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      float x = m;
#pragma unroll
      for (int h = 0; h < kH; ++h) x += mw.pre(g, h) * s[h];
      p[g] = valid ? wa::acc_exp(x - win.lse[g * kMixRegTokens + i]) : 0.0f;
    }
#pragma unroll
    for (int h = 0; h < kH; ++h) {
      float x = 0.0f;
#pragma unroll
      for (int g = 0; g < kH; ++g) x += mw.post(g, h) * dpm[g];
      dp[h] = x;
    }
  }
};

// kPipe (needs kVec): the per-window inputs are double-buffered, the next window's arriving by
// cp.async while the block computes on the current one (one block per SM leaves no other block to
// hide the loads behind).
template <typename T, int kH, bool kVec, bool kPipe>
__global__ void __launch_bounds__(kMixRegThreads, 1)
    head_mix_bwd_reg_kernel(const WindowAttentionBackwardParams b, int64_t slots, float* dtable_slots,
                            float* dmix_slots) {
  static_assert(kVec || !kPipe, "the cp.async pipeline copies 16-byte chunks");
  VF_DYNAMIC_SMEM(smem_raw);
  constexpr int ld = kMixRegLd, kMix = 2 * kH * kH + kH;
  const WindowAttentionParams& p = b.fwd;
  const int N = p.tokens, nn = N * N;
  const MixRegLayout L = mix_reg_layout(kH, N, true, kPipe);
  auto at = [&](size_t off) { return smem_raw + off; };
  // the per-window inputs of the copy that starts `shift` bytes in (pointers recomputed per
  // window rather than kept for both copies: registers are the scarce resource)
  auto inputs = [&](size_t shift) {
    return MixRegBuf<T>{reinterpret_cast<T*>(at(L.q + shift)), reinterpret_cast<T*>(at(L.k + shift)),
                        reinterpret_cast<T*>(at(L.v + shift)), reinterpret_cast<T*>(at(L.dout + shift)),
                        reinterpret_cast<float*>(at((p.mask != nullptr ? L.mask + shift : L.mask))),  // no mask: one zero mask
                        reinterpret_cast<float*>(at(L.lse + shift))};
  };
  T* dst = reinterpret_cast<T*>(at(L.dst));
  float* tbl = reinterpret_cast<float*>(at(L.bias));
  float* dd = reinterpret_cast<float*>(at(L.dd));
  float* dpart = reinterpret_cast<float*>(at(L.dpart));
  float* dtable = reinterpret_cast<float*>(at(L.dtable));
  const int64_t slot = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale = static_cast<float>(p.scale);
  const Strides3& gs = b.grad_qkv_strides;
  const int j0 = warp * 16;  // this warp's keys
  const bool keys_active = j0 < N;
  const int qtiles = round16(N) / 16;
  const bool want_table = dtable_slots != nullptr, want_mix = dmix_slots != nullptr;

  // the first window's loads go out before the one-time staging below
  if constexpr (kPipe) {
    if (slot < p.windows) mix_reg_issue_window<T, kH>(p, b.grad_out, slot, inputs(0));
  }
  // 4 heads: weights in shared memory (see MixRegWeightsShared)
  std::conditional_t<(kH >= 4), MixRegWeightsShared<kH>, MixRegWeights<kH>> mw;
  mw.init(p, 1.0f, reinterpret_cast<float*>(at(L.weights)));
  if constexpr (!kVec) {
    const MixRegBuf<T> first = inputs(0);
    mix_reg_zero_pads<T, kH>(first.q, p.dim_k);
    mix_reg_zero_pads<T, kH>(first.k, p.dim_k);
    mix_reg_zero_pads<T, kH>(first.v, p.dim_v);
    mix_reg_zero_pads<T, kH>(first.dout, p.dim_v);
  }
  // the table (constant over windows) and, without a mask, the zero mask are staged once
  if (want_table)
    for (int e = threadIdx.x; e < kH * nn; e += blockDim.x) dtable[e] = 0.0f;
  if (p.bias_buffer != nullptr) {
    mix_reg_copy(tbl, static_cast<const float*>(p.bias_buffer), kH * nn);
  } else {
    for (int e = threadIdx.x; e < kH * nn; e += blockDim.x) {
      const int h = e / nn, ij = e - h * nn;
      tbl[e] = mix_table_bias<float>(p, h, ij / N, ij % N);  // zero without a table
    }
  }
  if (p.mask == nullptr)
    for (int e = threadIdx.x; e < nn; e += blockDim.x) reinterpret_cast<float*>(at(L.mask))[e] = 0.0f;

  float dpre[kH][kH] = {}, dpost[kH][kH] = {}, dpost_bias[kH] = {};

  int it = 0;
  for (int64_t w = slot; w < p.windows; w += slots, ++it) {
    const MixRegBuf<T> cur = inputs(kPipe && (it & 1) ? L.window_stride : 0);
    if constexpr (kPipe) {
      cp_async_wait_all();
      __syncthreads();  // this window's inputs landed for every thread; the other copy's last reader is done
      if (w + slots < p.windows)
        mix_reg_issue_window<T, kH>(p, b.grad_out, w + slots, inputs((it & 1) ? 0 : L.window_stride));
    } else {
      __syncthreads();  // previous window fully consumed
      mix_reg_load_tiles<T, kH, kVec, true>(p, b.grad_out, w, cur);
      if (p.mask != nullptr) {
        constexpr int kPer = kMixRegTokens * kMixRegTokens / kMixRegThreads;  // loads in flight per thread
        float mv[kPer];
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
          const int e = static_cast<int>(threadIdx.x) + u * kMixRegThreads;
          mv[u] = e < nn ? mix_mask<float>(p, w, e / N, e % N) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < kPer; ++u) {
          const int e = static_cast<int>(threadIdx.x) + u * kMixRegThreads;
          if (e < nn) cur.mask[e] = mv[u];
        }
      }
      for (int e = threadIdx.x; e < kH * kMixRegTokens; e += blockDim.x) {
        const int h = e / kMixRegTokens, i = e - h * kMixRegTokens;
        cur.lse[e] = i < N ? static_cast<const float*>(p.lse)[(w * kH + h) * N + i] : 0.0f;
      }
      __syncthreads();
    }
    const T *q = cur.q, *k = cur.k, *v = cur.v, *dout = cur.dout;
    const MixRegWindow win{tbl, cur.mask, cur.lse, N, nn, scale};

    // pass 1: D_h[i] = sum_j P_h[i, j] dP_h[i, j], this warp's keys, per query tile
    if (keys_active) {
#pragma unroll 1
      for (int I = 0; I < qtiles; ++I) {
        float st[kH][2][4], dpt[kH][2][4];
        mix_reg_products<T, kH>(q, k, v, dout, j0, I, lane, st, dpt);
        float part[kH][2][2] = {};
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            MixRegEntry<kH> en;
            en.compute(mw, win, I, j0, lane, n, e, st, dpt);
#pragma unroll
            for (int h = 0; h < kH; ++h) part[h][n][e & 1] += en.p[h] * en.dp[h];
          }
        }
        // sum over the warp's 16 keys: the lanes of one t (xor 4, 8, 16)
#pragma unroll
        for (int h = 0; h < kH; ++h) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              float x = part[h][n][c];
              x += __shfl_xor_sync(0xffffffffu, x, 4);
              x += __shfl_xor_sync(0xffffffffu, x, 8);
              x += __shfl_xor_sync(0xffffffffu, x, 16);
              if (g == 0) dpart[(warp * kH + h) * kMixRegTokens + I * 16 + 8 * n + 2 * t + c] = x;
            }
          }
        }
      }
    } else {
      for (int e = lane; e < kH * kMixRegTokens; e += 32) dpart[warp * kH * kMixRegTokens + e] = 0.0f;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kH * kMixRegTokens; e += blockDim.x) {
      float x = 0.0f;
#pragma unroll
      for (int u = 0; u < kMixRegWarps; ++u) x += dpart[u * kH * kMixRegTokens + e];  // warp order
      dd[e] = x;
    }
    __syncthreads();

    // pass 2: the gradients
    if (keys_active) {
      float dk[kH][kMixRegD / 8][4] = {}, dv[kH][kMixRegD / 8][4] = {};
#pragma unroll 1
      for (int I = 0; I < qtiles; ++I) {
        float st[kH][2][4], dpt[kH][2][4];
        mix_reg_products<T, kH>(q, k, v, dout, j0, I, lane, st, dpt);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            MixRegEntry<kH> en;
            en.compute(mw, win, I, j0, lane, n, e, st, dpt);
            const int i = en.i, j = en.j;
            const bool valid = en.valid;
            float dsm[kH];  // dS'_g
#pragma unroll
            for (int gg = 0; gg < kH; ++gg) dsm[gg] = en.p[gg] * (en.dp[gg] - dd[gg * kMixRegTokens + i]);
#pragma unroll
            for (int h = 0; h < kH; ++h) {
              float ds = 0.0f, pm = mw.post_bias(h);
#pragma unroll
              for (int gg = 0; gg < kH; ++gg) {
                ds += mw.pre(gg, h) * dsm[gg];
                pm += mw.post(h, gg) * en.p[gg];
              }
              st[h][n][e] = valid ? pm : 0.0f;  // P'_h
              dpt[h][n][e] = ds;                // dS_h (zero outside the window: P is)
              if (want_table && valid) dtable[h * nn + i * N + j] += ds;
            }
            if (want_mix && valid) {
#pragma unroll
              for (int gg = 0; gg < kH; ++gg) {
#pragma unroll
                for (int h = 0; h < kH; ++h) {
                  dpre[gg][h] += dsm[gg] * en.s[h];
                  dpost[gg][h] += en.dpm[gg] * en.p[h];
                }
                dpost_bias[gg] += en.dpm[gg];
              }
            }
          }
        }
        // dV_h += P'^T_h dO_h, dK_h += dS^T_h Q_h (score scale at the end); dS^T_h to shared memory
#pragma unroll
        for (int h = 0; h < kH; ++h) {
          uint32_t pa[4], da[4];
          c_tiles_to_a<T>(st[h][0], st[h][1], pa);
          c_tiles_to_a<T>(dpt[h][0], dpt[h][1], da);
          mma_times_rows<T, kMixRegD>(dv[h], pa, dout + h * kMixRegTile + I * 16 * ld, ld, lane);
          mma_times_rows<T, kMixRegD>(dk[h], da, q + h * kMixRegTile + I * 16 * ld, ld, lane);
          T* d0 = dst + h * kMixRegTokens * kMixRegLdS + (j0 + g) * kMixRegLdS + I * 16 + 2 * t;
          T* d1 = d0 + 8 * kMixRegLdS;
          *reinterpret_cast<uint32_t*>(d0) = da[0];
          *reinterpret_cast<uint32_t*>(d1) = da[1];
          *reinterpret_cast<uint32_t*>(d0 + 8) = da[2];
          *reinterpret_cast<uint32_t*>(d1 + 8) = da[3];
        }
      }
#pragma unroll
      for (int h = 0; h < kH; ++h) {
        store_rows<T, kMixRegD, kVec>(dk[h], scale, j0, N, p.dim_k, [&](int j) {
          return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + p.k_off +
                 h * p.head_stride;
        });
        store_rows<T, kMixRegD, kVec>(dv[h], 1.0f, j0, N, p.dim_v, [&](int j) {
          return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + p.v_off +
                 h * p.head_stride;
        });
      }
    }
    __syncthreads();  // dS^T complete

    // dQ_h of query rows 16 warp .. = dS_h K_h over every key (A: dS^T through ldmatrix.trans)
    const int i0 = warp * 16;
    if (i0 < N) {
#pragma unroll
      for (int h = 0; h < kH; ++h) {
        float dq[kMixRegD / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < kMixRegTokens / 16; ++kk) {
          if (kk >= qtiles) continue;
          uint32_t a[4];
          mma::ldmatrix_x4_trans(a, dst + h * kMixRegTokens * kMixRegLdS +
                                        (kk * 16 + (lane & 7) + (lane >> 4) * 8) * kMixRegLdS + i0 +
                                        ((lane >> 3) & 1) * 8);
          mma_times_rows<T, kMixRegD>(dq, a, k + h * kMixRegTile + kk * 16 * ld, ld, lane);
        }
        store_rows<T, kMixRegD, kVec>(dq, scale, i0, N, p.dim_k, [&](int i) {
          return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, i) + p.q_off +
                 h * p.head_stride;
        });
      }
    }
  }

  // the block's sums, once per slot: the table gradient as summed, the mixing gradients reduced
  // over lanes (butterfly) and warps (in order) -- [pre (H x H) | post (H x H) | post_bias (H)]
  __syncthreads();
  if (want_table) {
    float* out = dtable_slots + slot * static_cast<int64_t>(kH) * nn;
    for (int e = threadIdx.x; e < kH * nn; e += blockDim.x) out[e] = dtable[e];
  }
  if (want_mix) {
    float* red = dpart;  // free after the last window's D
#pragma unroll
    for (int e = 0; e < kMix; ++e) {
      float x = e < kH * kH ? dpre[e / kH][e % kH] : e < 2 * kH * kH ? dpost[(e - kH * kH) / kH][(e - kH * kH) % kH]
                                                                     : dpost_bias[e - 2 * kH * kH];
#pragma unroll
      for (int off = 16; off >= 1; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
      if (lane == 0) red[warp * kMix + e] = x;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kMix; e += blockDim.x) {
      float x = 0.0f;
#pragma unroll
      for (int u = 0; u < kMixRegWarps; ++u) x += red[u * kMix + e];
      dmix_slots[slot * kMix + e] = x;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch

// Pipelined (cp.async double buffering) where mix_reg_pipelined allows it; 3 heads only (4 leave
// no shared memory for a second buffer, and their kernels are not instantiated).
template <typename T, int kH>
auto mix_reg_bwd_kernel_for(const WindowAttentionBackwardParams& b) {
  if (!vec_ok<T>(b.fwd, b.grad_out)) return head_mix_bwd_reg_kernel<T, kH, false, false>;
  if constexpr (kH == 3) {
    if (mix_reg_pipelined(b.fwd, true)) return head_mix_bwd_reg_kernel<T, kH, true, true>;
  }
  return head_mix_bwd_reg_kernel<T, kH, true, false>;
}

template <typename T, int kH>
size_t mix_reg_bwd_smem(const WindowAttentionBackwardParams& b) {
  const bool pipe = kH == 3 && vec_ok<T>(b.fwd, b.grad_out) && mix_reg_pipelined(b.fwd, true);
  return mix_reg_layout(kH, b.fwd.tokens, true, pipe).total;
}

template <typename F>
auto with_mix_reg_heads(int heads, F&& f) {
  return heads == 3 ? f(std::integral_constant<int, 3>{}) : f(std::integral_constant<int, 4>{});
}

inline int64_t mix_reg_fwd_workspace(const WindowAttentionParams& p) {
  return (p.mask != nullptr ? p.mask_windows : 1) * mix_reg_bias_block(p.heads, p.tokens);
}

// Backward slots: one wave of resident blocks when sums over windows are wanted (the table or
// mixing gradients), each looping over windows / slots windows; else one block per window.
template <typename T, int kH>
int64_t mix_reg_bwd_slots(const WindowAttentionBackwardParams& b) {
  const WindowAttentionParams& p = b.fwd;
  if (b.dbias == nullptr && b.grad_pre_mix == nullptr) return p.windows;
  const int per_sm = resident_blocks_per_sm(mix_reg_bwd_kernel_for<T, kH>(b), kMixRegThreads,
                                            mix_reg_bwd_smem<T, kH>(b), 1);
  return std::max<int64_t>(1, std::min<int64_t>(p.windows, static_cast<int64_t>(per_sm) * device_sms()));
}

// Backward workspace (floats): [table-gradient slots (slots x H x N x N) | mixing slots (slots x (2H^2 + H))]
template <typename T>
int64_t mix_reg_bwd_workspace(const WindowAttentionBackwardParams& b) {
  const WindowAttentionParams& p = b.fwd;
  const int64_t slots = with_mix_reg_heads(p.heads, [&](auto h) { return mix_reg_bwd_slots<T, decltype(h)::value>(b); });
  const int64_t H = p.heads, nn = static_cast<int64_t>(p.tokens) * p.tokens;
  return (b.dbias != nullptr ? slots * H * nn : 0) + (b.grad_pre_mix != nullptr ? slots * (2 * H * H + H) : 0);
}

template <typename T, int kH>
int mix_reg_forward(const WindowAttentionParams& p, float* mixed_bias, cudaStream_t stream) {
  auto fill = head_mix_reg_bias_kernel<kH>;
  VF_LAUNCH(fill, blocks_for(mix_reg_fwd_workspace(p), 256), 256, 0, stream, p, mixed_bias);
  auto kernel = vec_ok<T>(p, nullptr) ? head_mix_fwd_reg_kernel<T, kH, true> : head_mix_fwd_reg_kernel<T, kH, false>;
  const size_t smem = mix_reg_layout(kH, p.tokens, false).total;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  VF_LAUNCH(kernel, static_cast<unsigned>(p.windows), kMixRegThreads, smem, stream, p,
            static_cast<const float*>(mixed_bias));
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int kH>
int mix_reg_backward(const WindowAttentionBackwardParams& b, float* workspace, cudaStream_t stream) {
  const WindowAttentionParams& p = b.fwd;
  constexpr int kThreads = 256;
  const int64_t H = kH, nn = static_cast<int64_t>(p.tokens) * p.tokens, kMix = 2 * H * H + H;
  const int64_t slots = mix_reg_bwd_slots<T, kH>(b);
  float* dtable_slots = b.dbias != nullptr ? workspace : nullptr;
  float* dmix_slots = b.grad_pre_mix != nullptr ? workspace + (b.dbias != nullptr ? slots * H * nn : 0) : nullptr;
  if (p.bias_buffer != nullptr) {  // the (heads, N, N) table bias the kernel stages
    auto fill = head_mix_table_kernel<float>;
    VF_LAUNCH(fill, blocks_for(H * nn, 256), 256, 0, stream, p);
  }
  auto kernel = mix_reg_bwd_kernel_for<T, kH>(b);
  const size_t smem = mix_reg_bwd_smem<T, kH>(b);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  VF_LAUNCH(kernel, static_cast<unsigned>(slots), kMixRegThreads, smem, stream, b, slots, dtable_slots, dmix_slots);
  auto reduce = window_attention_slot_reduce_kernel<float>;
  if (dtable_slots != nullptr)
    VF_LAUNCH(reduce, blocks_for(H * nn, kThreads), kThreads, 0, stream, dtable_slots, slots, H * nn,
              static_cast<float*>(b.dbias));
  if (dmix_slots != nullptr)
    VF_LAUNCH(reduce, blocks_for(kMix, kThreads), kThreads, 0, stream, dmix_slots, slots, kMix,
              static_cast<float*>(b.grad_pre_mix));
  return static_cast<int>(cudaGetLastError());
}

// Entry points for the per-dtype units: false when the register kernels do not take the shape.
template <typename T>
bool mix_reg_try_forward_workspace(const WindowAttentionParams& p, int64_t* elements) {
  if constexpr (sizeof(T) == 2) {
    if (!mix_reg_route_ok(p)) return false;
    *elements = mix_reg_fwd_workspace(p);
    return true;
  }
  return false;
}

template <typename T>
bool mix_reg_try_forward(const WindowAttentionParams& p, void* workspace, cudaStream_t stream, int* err) {
  if constexpr (sizeof(T) == 2) {
    if (!mix_reg_route_ok(p)) return false;
    *err = with_mix_reg_heads(p.heads, [&](auto h) {
      return mix_reg_forward<T, decltype(h)::value>(p, static_cast<float*>(workspace), stream);
    });
    return true;
  }
  return false;
}

template <typename T>
bool mix_reg_try_backward_workspace(const WindowAttentionBackwardParams& b, int64_t* elements) {
  if constexpr (sizeof(T) == 2) {
    if (!mix_reg_route_ok(b.fwd)) return false;
    *elements = mix_reg_bwd_workspace<T>(b);
    return true;
  }
  return false;
}

template <typename T>
bool mix_reg_try_backward(const WindowAttentionBackwardParams& b, void* workspace, cudaStream_t stream, int* err) {
  if constexpr (sizeof(T) == 2) {
    if (!mix_reg_route_ok(b.fwd)) return false;
    *err = with_mix_reg_heads(b.fwd.heads, [&](auto h) {
      return mix_reg_backward<T, decltype(h)::value>(b, static_cast<float*>(workspace), stream);
    });
    return true;
  }
  return false;
}

}  // namespace
}  // namespace vitfast
