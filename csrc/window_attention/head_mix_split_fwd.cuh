// Head-mixing attention forward with the heads split between warps: 16 heads of <= 64 channels
// (CaiT-M, Mini-Swin-B stage 3) and 24 of <= 32 (Mini-Swin-T/S stage 4), fp16/bf16, with or without
// a table and a mask; 12 heads of 48-64 (DeiT-B) with VITFAST_HEAD_MIX_SPLIT_FWD=1. Compiled in
// head_mix_split_fwd_<dtype>_cuda.cu; the streaming forward's dispatch (head_mix_stream.cuh's
// caller, head_mix_dtype.cuh) calls it.
//
// Why: the streaming forward (head_mix_stream.cuh) keeps the score tiles of every head in each
// warp's registers (8 x heads): 16 heads spilled 4 KB, so these shapes ran the tile kernels. Here,
// as in head_mix_split_bwd.cuh, the products go through shared memory and no warp holds every head.
//
// Block: 16 query rows of one window, every head, 8 warps; key (and value) tiles of 16 rows of
// every head streamed by cp.async, double-buffered. Per tile, (1) warp w forms the raw scores
// q_h k_h^T of heads kHW (w % 4) .. for key half w / 4 (8 keys) into the float exchange; barrier;
// (2) thread i mixes entry (i / 16, i % 16) over every head; barrier; (3) pass 2 only: each warp
// multiplies its heads' P' tiles into O (half of the columns each). Two passes over the keys:
//   pass 1: per thread a running max and sum of each mixed head's scores over its entries of the
//     row, merged over the row's 16 threads at the end into lse (written out for the backward);
//   pass 2: P_h = exp(S'_h - lse_h) of every head, P'_g = sum_h post[g, h] P_h + post_bias[g] as a
//     16-bit tile, O_g += P'_g V_g.
// Every score is formed twice in all (the streaming forward: 1 + groups of heads times).
#pragma once

#include "head_mix_split_common.cuh"
#include "head_mix_split_fwd_entry.h"

namespace vitfast {
namespace {

template <typename T, int kH, int D, bool kVec>
__global__ void __launch_bounds__(kMixSplitThreads, 1)
    head_mix_fwd_split_kernel(const WindowAttentionParams p, const float* mixed_bias) {
  using W = MixSplitWeights<kH>;
  constexpr int kHW = kH / 4, ld = D + 8, kTile = kMixSplitRows * ld, kDh = D / 2;
  constexpr int kX = kMixSplitXPitch, kY = kMixSplitRows * kMixSplitYLd;
  VF_DYNAMIC_SMEM(smem_raw);
  const MixSplitFwdLayout L = mix_split_fwd_layout(kH, D);
  T* q = reinterpret_cast<T*>(smem_raw + L.q);
  float* xs = reinterpret_cast<float*>(smem_raw + L.xch);  // raw scores, [head][row][key]
  T* yp = reinterpret_cast<T*>(smem_raw + L.half);          // P', [head][row][key]
  float* wp = reinterpret_cast<float*>(smem_raw + L.weights);
  float* lse_rows = reinterpret_cast<float*>(smem_raw + L.lse);  // [16 rows][kH]
  const W mw{wp};
  const int N = p.tokens;
  const int chunks = (N + kMixSplitRows - 1) / kMixSplitRows, tiles = (N + kMixStreamKeys - 1) / kMixStreamKeys;
  const int64_t w = blockIdx.x / chunks;
  const int row0 = static_cast<int>(blockIdx.x % chunks) * kMixSplitRows;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int h0 = (warp & 3) * kHW, half = warp >> 2;  // products: heads h0 .., key half; O: column half
  const int er = tid >> 4, ec = tid & 15, row = row0 + er;  // the thread's entry: row er, key ec
  const int steps = 2 * tiles;
  const int nn = N * N;
  const float* mb = mix_stream_window_bias<kH>(mixed_bias, p, w);

  // step s: key tile s % tiles of every head (and in pass 2 its value tile)
  auto issue = [&](int s) {
    const int kt = s % tiles, buf = s & 1;
    mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, mix_qkv_rows<T>(p, p.k_off, p.dim_k), w,
                                                       reinterpret_cast<T*>(smem_raw + L.k + buf * L.tile_buffer), 0,
                                                       kH, kt * kMixStreamKeys, kMixStreamKeys);
    if (s >= tiles)
      mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, mix_qkv_rows<T>(p, p.v_off, p.dim_v), w,
                                                         reinterpret_cast<T*>(smem_raw + L.v + buf * L.tile_buffer),
                                                         0, kH, kt * kMixStreamKeys, kMixStreamKeys);
  };
  mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, mix_qkv_rows<T>(p, p.q_off, p.dim_k), w, q, 0, kH, row0,
                                                     kMixSplitRows);
  issue(0);
  cp_async_commit();
  W::fill(p, static_cast<float>(p.scale), wp);

  // the tile's raw scores (buffer buf) of the warp's heads and key half into the exchange
  auto products = [&](int buf) {
    const T* kb = reinterpret_cast<const T*>(smem_raw + L.k + buf * L.tile_buffer);
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int hi = 0; hi < kHW; ++hi) {
      const int h = h0 + hi;
      float c[1][4];
      mix_stream_products_half<T, 1, D>(q + h * kTile, 0, kb + h * kTile, lane, half, c);
#pragma unroll
      for (int e = 0; e < 4; ++e) xs[h * kX + (g + 8 * (e >> 1)) * 16 + 8 * half + 2 * t + (e & 1)] = c[0][e];
    }
  };
  // the thread's mixed scores S'_g = sum_h (scale pre[g, h]) raw_h + M_g of key tile kt
  auto mixed = [&](int kt, bool& valid, float (&s)[kH]) {
    const int key = kt * kMixStreamKeys + ec;
    valid = row < N && key < N;
    float raw[kH];
#pragma unroll
    for (int h = 0; h < kH; ++h) raw[h] = xs[h * kX + er * 16 + ec];
    const int at = row * N + key;
#pragma unroll
    for (int g = 0; g < kH; ++g)
      s[g] = mw.dot(W::kPre, g, raw) + (mb != nullptr && valid ? __ldg(mb + g * nn + at) : 0.0f);
  };

  // pass 1: the row's lse of every mixed head
  {
    float m[kH], l[kH];
#pragma unroll
    for (int g = 0; g < kH; ++g) m[g] = wa::neg_inf<float>(), l[g] = 0.0f;
    for (int kt = 0; kt < tiles; ++kt) {
      mix_stream_begin_step(issue, kt, steps);
      products(kt & 1);
      __syncthreads();
      bool valid;
      float s[kH];
      mixed(kt, valid, s);
      if (valid) {
#pragma unroll
        for (int g = 0; g < kH; ++g) {
          if (s[g] == wa::neg_inf<float>()) continue;  // adds nothing (and would make exp(-inf + inf))
          if (s[g] > m[g]) {
            l[g] = l[g] * wa::acc_exp(m[g] - s[g]) + 1.0f;
            m[g] = s[g];
          } else {
            l[g] += wa::acc_exp(s[g] - m[g]);
          }
        }
      }
      __syncthreads();  // the exchange is rewritten by the next tile; buffer kt & 1 refilled by kt + 2's issue
    }
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      float mq = m[g];
#pragma unroll
      for (int off = 8; off >= 1; off /= 2) mq = max(mq, __shfl_xor_sync(0xffffffffu, mq, off));  // the row's 16 threads
      float part = m[g] == wa::neg_inf<float>() ? 0.0f : l[g] * wa::acc_exp(m[g] - mq);
#pragma unroll
      for (int off = 8; off >= 1; off /= 2) part += __shfl_xor_sync(0xffffffffu, part, off);
      const float lse = mq + wa::acc_log(part);  // -inf for a row without a finite score
      if (ec == 0) {
        lse_rows[er * kH + g] = lse;  // read after the next barrier
        if (row < N) static_cast<float*>(p.lse)[(w * kH + g) * N + row] = lse;
      }
    }
  }

  // pass 2: P of every head, P'_g as 16-bit tiles, O_g += P'_g V_g (warp: its heads, its column half)
  float o[kHW][kDh / 8][4];
#pragma unroll
  for (int hi = 0; hi < kHW; ++hi) {
#pragma unroll
    for (int n = 0; n < kDh / 8; ++n) o[hi][n][0] = o[hi][n][1] = o[hi][n][2] = o[hi][n][3] = 0.0f;
  }
  for (int kt = 0, step = tiles; kt < tiles; ++kt, ++step) {
    mix_stream_begin_step(issue, step, steps);
    const int buf = step & 1;
    products(buf);
    __syncthreads();
    {
      bool valid;
      float s[kH];
      mixed(kt, valid, s);
#pragma unroll
      for (int g = 0; g < kH; ++g) s[g] = valid ? wa::acc_exp(s[g] - lse_rows[er * kH + g]) : 0.0f;  // P
#pragma unroll
      for (int g = 0; g < kH; ++g) {
        const float pp = valid ? mw.post_bias(g) + mw.dot(W::kPost, g, s) : 0.0f;  // P' (bias inside the N x N)
        yp[g * kY + er * kMixSplitYLd + ec] = wa::from_acc<T>(pp);
      }
    }
    __syncthreads();
    mix_split_accumulate<T, kHW, kDh, D>(o, yp, reinterpret_cast<const T*>(smem_raw + L.v + buf * L.tile_buffer), h0,
                                         half * kDh, lane);
    __syncthreads();  // the exchanges are rewritten by the next tile; buffer step & 1 refilled by step + 2's issue
  }
  const Strides3& os = p.out_strides;
#pragma unroll
  for (int hi = 0; hi < kHW; ++hi) {
    const int h = h0 + hi, col0 = half * kDh;
    store_rows<T, kDh, kVec>(o[hi], 1.0f, row0, N, p.dim_v - col0, [&](int i) {
      return static_cast<T*>(p.out) + token_offset(p.grid, os.img, os.y, os.x, w, i) + h * p.dim_v + col0;
    });
  }
}

template <typename T, int kH, int D>
int mix_split_forward(const WindowAttentionParams& p, float* workspace, cudaStream_t stream) {
  const float* mixed_bias = mix_stream_fill_bias<kH>(p, workspace, stream);
  auto kernel = vec_ok<T>(p, nullptr) ? head_mix_fwd_split_kernel<T, kH, D, true>
                                      : head_mix_fwd_split_kernel<T, kH, D, false>;
  const size_t smem = mix_split_fwd_layout(kH, D).total;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t chunks = (p.tokens + kMixSplitRows - 1) / kMixSplitRows;
  VF_LAUNCH(kernel, static_cast<unsigned>(p.windows * chunks), kMixSplitThreads, smem, stream, p, mixed_bias);
  return static_cast<int>(cudaGetLastError());
}

// The shapes of mix_split_fwd_runs: (12, 64), (16, 32), (16, 64), (24, 32).
template <typename T>
int mix_split_forward_any(const WindowAttentionParams& p, float* mixed_bias, cudaStream_t stream) {
  const int D = mix_stream_dim(p.dim_k, p.dim_v);
  if (p.heads == 12) return mix_split_forward<T, 12, 64>(p, mixed_bias, stream);
  if (p.heads == 24) return mix_split_forward<T, 24, 32>(p, mixed_bias, stream);
  return D == 32 ? mix_split_forward<T, 16, 32>(p, mixed_bias, stream) : mix_split_forward<T, 16, 64>(p, mixed_bias, stream);
}

}  // namespace
}  // namespace vitfast
