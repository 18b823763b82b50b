// Head-mixing attention backward with the heads split between warps: 12 heads of 48-64 channels
// (DeiT-B, B128 N197 and N577 in issue 12's bars) and 16 of <= 32 (Mini-Swin-B stage 3), fp16/bf16,
// with or without a table and a mask. Shares its pieces with the head-split forward
// (head_mix_split_common.cuh).
// Compiled in head_mix_split_bwd_<dtype>_cuda.cu; head_mix_stream_bwd.cuh's dispatch calls it.
//
// Why not the streaming kernels (head_mix_stream_bwd.cuh): they keep both products of every head
// for a 16 x 16 tile in each warp's registers and 64 resident rows of every head in shared memory.
// At 12 heads of 64 the rows alone are 221 KB, and the products 192 registers. Here no warp holds
// every head: the mixes couple the heads only entry by entry, so the products go through shared
// memory.
//
// Both kernels: 8 warps, 16 resident rows of every head, 16-row tiles of every head streamed by
// cp.async (double-buffered, as in head_mix_stream.cuh). Per tile:
//   1. products: warp w forms one product of a quarter of the heads, kHW (w % 4) .. kHW (w % 4) +
//      kHW - 1 (kHW = 3 at 12 heads, 4 at 16), on tensor cores -- the raw scores (w < 4) or dP'
//      (w >= 4) -- and writes them to the float exchange;
//   2. mixing: thread i takes entry (i / 16, i % 16) of the 16 x 16 tile and mixes it over every
//      head (P, dP, dS', dA; the key-major kernel P' too), in fp32, writing 16-bit tiles for step 3;
//   3. accumulation: each warp multiplies the exchanged tiles of its heads into its accumulators.
// Every product is formed once per pass (the streaming kernels re-form every head's products per
// group of heads) and no warp holds more than a quarter of the heads' accumulators.
//
// Query-major kernel (16 query rows per block; K and V tiles streamed), two passes over the keys:
//   pass D: D_h = rowsum(P_h dP_h), summed over the row's 16 threads at the end;
//   main pass: dA of every head -> dQ_h += dA_h K_h (warp w: its kHW heads, half of the columns);
//     the table gradient per entry (as in the streaming kernels: an entry is always added to by
//     the same thread, plain adds in item order); with mixing gradients, S, dP', P and dS' of every
//     head stay in the exchange and each lane sums a kHW x kHW block of d post = sum dP'_g P_h or d pre
//     = sum dS'_g S_h (and d post_bias) over its warp's 32 entries of the tile: per-lane partials,
//     no shuffles, added to the warp's sums in the workspace per item; then over warps and blocks
//     in order (bitwise reproducible).
// Key-major kernel (16 keys per block; q and dO tiles streamed with their lse and D), one pass:
//   P'_h and dA_h of every head per entry -> dV_h += P'^T_h dO_h (warps 0-3) and dK_h += dA^T_h Q_h
//   (warps 4-7), each warp its kHW heads: complete per block, no atomics.
#pragma once

#include "head_mix_split_bwd_entry.h"
#include "head_mix_split_common.cuh"
#include "head_mix_stream_bwd.cuh"

namespace vitfast {
namespace {

// Entry e (row-major in the 16 x 16 tile) of every head: raw scores and dP' from the float
// exchanges xs / xd (dpm zeroed outside the N x N), P_g = exp(S'_g - lse_g) (zero outside),
// dP_h = sum_g post[g, h] dP'_g, dS'_g = P_g (dP_g - D_g).
template <int kH, typename Lse, typename Dd, typename Bias>
__device__ __forceinline__ void mix_split_entry(const MixSplitWeights<kH>& mw, bool valid, const float* xs,
                                                const float* xd, int e, Lse lse, Dd dd, Bias bias, float (&raw)[kH],
                                                float (&dpm)[kH], float (&p)[kH], float (&ds)[kH]) {
  using W = MixSplitWeights<kH>;
#pragma unroll
  for (int h = 0; h < kH; ++h) {
    raw[h] = xs[h * kMixSplitXPitch + e];
    dpm[h] = valid ? xd[h * kMixSplitXPitch + e] : 0.0f;
  }
#pragma unroll
  for (int g = 0; g < kH; ++g) p[g] = valid ? wa::acc_exp(mw.dot(W::kPre, g, raw) + bias(g) - lse(g)) : 0.0f;
#pragma unroll
  for (int g = 0; g < kH; ++g) ds[g] = p[g] * (mw.dot(W::kPostT, g, dpm) - dd(g));
}

// ---------------------------------------------------------------------------------------------
// Query-major: D, dQ, the mixing and table gradients

template <typename T, int kH, int D, bool kVec>
__global__ void __launch_bounds__(kMixSplitThreads, 1)
    head_mix_bwd_split_q_kernel(const WindowAttentionBackwardParams b, const float* mixed_bias,
                                const float* table_bias, float* dd_out, float* mix_partials, float* dtable_slots) {
  using W = MixSplitWeights<kH>;
  constexpr int kHW = kH / 4, kMix = 2 * kH * kH + kH;
  constexpr int kX = kMixSplitXPitch, kY = kMixSplitRows * kMixSplitYLd, kDh = D / 2;
  const WindowAttentionParams& p = b.fwd;
  VF_DYNAMIC_SMEM(smem_raw);
  const MixSplitBwdLayout L = mix_split_bwd_layout(kH, D, false);
  T* q = reinterpret_cast<T*>(smem_raw + L.rows_a);
  T* dout = reinterpret_cast<T*>(smem_raw + L.rows_b);
  float* xs = reinterpret_cast<float*>(smem_raw + L.xch);  // raw scores; with mixing gradients then S / scale
  float* xd = xs + kH * kX;                                 // dP'
  float* xp = xd + kH * kX;                                 // P
  float* xg = xp + kH * kX;                                 // dS'
  T* ya = reinterpret_cast<T*>(smem_raw + L.half);          // scale dA, [head][row][key]
  float* wp = reinterpret_cast<float*>(smem_raw + L.weights);
  float* lse_rows = reinterpret_cast<float*>(smem_raw + L.stats);  // [16 rows][kH]
  float* dd_rows = lse_rows + kMixSplitRows * kH;                    // [16 rows][kH]
  const W mw{wp};
  const int N = p.tokens;
  const int chunks = (N + kMixSplitRows - 1) / kMixSplitRows, tiles = (N + kMixStreamKeys - 1) / kMixStreamKeys;
  const int64_t items = p.windows * chunks;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int role = warp >> 2, h0 = (warp & 3) * kHW;  // products: role 0 scores, 1 dP'; dQ: column half `role`
  const int er = tid >> 4, ec = tid & 15;              // the thread's entry: row er, key ec of the tile
  const bool want_mix = mix_partials != nullptr;
  const int steps = 2 * tiles;
  const float scale = static_cast<float>(p.scale), inv_scale = 1.0f / scale;
  const Strides3& gs = b.grad_qkv_strides;
  const MixRows<T> k_src = mix_qkv_rows<T>(p, p.k_off, p.dim_k), v_src = mix_qkv_rows<T>(p, p.v_off, p.dim_v);
  const MixRows<T> q_src = mix_qkv_rows<T>(p, p.q_off, p.dim_k);
  const MixRows<T> o_src{static_cast<const T*>(b.grad_out), p.out_strides, 0, p.dim_v, p.dim_v};

  W::fill(p, scale, wp);
  // the lane's block of the mixing-gradient sums: matrix mm (0: d post[g, h] = sum dP'_g P_h, and
  // d post_bias[g] = sum dP'_g in the lanes of the first column block; 1: d pre[g, h] = sum dS'_g
  // S_h), rows gb .. gb + kHW - 1, columns hb ..; each warp's sums [pre | post | post_bias] over
  // its entries of the block's items in the workspace, every entry owned by one lane
  const int mm = lane >> 4, gb = ((lane >> 2) & 3) * kHW, hb = (lane & 3) * kHW;
  const float* m_rows = mm == 0 ? xd : xg;
  const float* m_cols = mm == 0 ? xp : xs;
  float* sums = want_mix ? mix_partials + (static_cast<int64_t>(blockIdx.x) * kMixSplitWarps + warp) * kMix : nullptr;
  if (want_mix)
    for (int e = lane; e < kMix; e += 32) sums[e] = 0.0f;
  const int nn = N * N;
  float* dtable = dtable_slots != nullptr ? dtable_slots + static_cast<int64_t>(blockIdx.x) * kH * nn : nullptr;
  if (dtable != nullptr)
    for (int e = tid; e < kH * nn; e += kMixSplitThreads) dtable[e] = 0.0f;  // before the first item's barrier

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t w = item / chunks;
    const int row0 = static_cast<int>(item % chunks) * kMixSplitRows, row = row0 + er;
    const float* mb = mix_stream_window_bias<kH>(mixed_bias, p, w);
    auto issue = [&](int s) {  // step s: key and value tiles (every head) of key tile s % tiles
      mix_split_issue_pair<T, kH, D, kVec>(p, k_src, v_src, w, smem_raw, L.tile_a, L.tile_b, L.tile_buffer, s & 1,
                                           (s % tiles) * kMixStreamKeys);
    };
    __syncthreads();  // the previous item's last readers of every buffer are done
    mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, q_src, w, q, 0, kH, row0, kMixSplitRows);
    mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, o_src, w, dout, 0, kH, row0, kMixSplitRows);
    issue(0);
    cp_async_commit();
    for (int e = tid; e < kMixSplitRows * kH; e += kMixSplitThreads) {
      const int r = e / kH, h = e - r * kH;
      lse_rows[e] = row0 + r < N ? static_cast<const float*>(p.lse)[(w * kH + h) * N + row0 + r] : 0.0f;
    }
    // the tile's products (buffer buf) into the exchange: raw scores (role 0) or dP' (role 1)
    auto products = [&](int buf) {
      const size_t off = (role == 0 ? L.tile_a : L.tile_b) + buf * L.tile_buffer;
      mix_split_products<T, kHW, D>(role == 0 ? q : dout, reinterpret_cast<const T*>(smem_raw + off), h0,
                                    role == 0 ? xs : xd, lane);
    };
    // the thread's entry of key tile kt: raw scores and dP' of every head, P and dS'
    // (dd(h): D_h of the row)
    auto entry = [&](int kt, bool& valid, float (&raw)[kH], float (&dpm)[kH], float (&pr)[kH], float (&ds)[kH],
                     auto dd) {
      const int key = kt * kMixStreamKeys + ec;
      valid = row < N && key < N;
      const int at = row * N + key;
      mix_split_entry<kH>(
          mw, valid, xs, xd, er * 16 + ec, [&](int h) { return lse_rows[er * kH + h]; }, dd,
          [&](int g) { return mb != nullptr && valid ? __ldg(mb + g * nn + at) : 0.0f; }, raw, dpm, pr, ds);
    };
    int step = 0;

    // pass D: the thread's partial D_h = sum P_h dP_h over its entries of the row (dS' with D = 0)
    {
      float dpart[kH] = {};
      for (int kt = 0; kt < tiles; ++kt, ++step) {
        mix_stream_begin_step(issue, step, steps);
        products(step & 1);
        __syncthreads();
        bool valid;
        float raw[kH], dpm[kH], pr[kH], pdp[kH];
        entry(kt, valid, raw, dpm, pr, pdp, [](int) { return 0.0f; });
#pragma unroll
        for (int h = 0; h < kH; ++h) dpart[h] += pdp[h];
        __syncthreads();  // the exchange is rewritten by the next tile; buffer step & 1 refilled by step + 2's issue
      }
#pragma unroll
      for (int h = 0; h < kH; ++h) {
        float x = dpart[h];
#pragma unroll
        for (int off = 8; off >= 1; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);  // the row's 16 threads
        if (ec == 0) {
          dd_rows[er * kH + h] = x;  // read after the next barrier
          if (row < N) dd_out[(w * kH + h) * N + row] = x;
        }
      }
    }

    // main pass: dA -> dQ, the table gradient, the mixing gradients
    float dq[kHW][kDh / 8][4];
#pragma unroll
    for (int hi = 0; hi < kHW; ++hi) {
#pragma unroll
      for (int n = 0; n < kDh / 8; ++n) dq[hi][n][0] = dq[hi][n][1] = dq[hi][n][2] = dq[hi][n][3] = 0.0f;
    }
    float macc[kHW][kHW] = {}, mpb[kHW] = {};
    for (int kt = 0; kt < tiles; ++kt, ++step) {
      mix_stream_begin_step(issue, step, steps);
      const int buf = step & 1;
      products(buf);
      __syncthreads();
      {
        bool valid;
        float raw[kH], dpm[kH], pr[kH], ds[kH];
        entry(kt, valid, raw, dpm, pr, ds, [&](int h) { return dd_rows[er * kH + h]; });
        const int key = kt * kMixStreamKeys + ec, at = row * N + key, e = er * 16 + ec;
#pragma unroll
        for (int h = 0; h < kH; ++h) {
          const float da = mw.dot(W::kPreT, h, ds);  // scale dA_h (zero outside the N x N: P is)
          ya[h * kY + er * kMixSplitYLd + ec] = wa::from_acc<T>(da);
          if (dtable != nullptr && valid) dtable[h * nn + at] += da * inv_scale;
        }
        if (want_mix) {
#pragma unroll
          for (int h = 0; h < kH; ++h) {
            xs[h * kX + e] = raw[h] + (table_bias != nullptr && valid ? inv_scale * __ldg(table_bias + h * nn + at) : 0.0f);
            xd[h * kX + e] = dpm[h];
            xp[h * kX + e] = pr[h];
            xg[h * kX + e] = ds[h];
          }
        }
      }
      __syncthreads();
      mix_split_accumulate<T, kHW, kDh, D>(dq, ya, reinterpret_cast<const T*>(smem_raw + L.tile_a + buf * L.tile_buffer),
                                           h0, role * kDh, lane);
      if (want_mix) {
        for (int e = warp * 32; e < warp * 32 + 32; ++e) {
          float u[kHW], v[kHW];
#pragma unroll
          for (int i = 0; i < kHW; ++i) u[i] = m_rows[(gb + i) * kX + e], v[i] = m_cols[(hb + i) * kX + e];
#pragma unroll
          for (int i = 0; i < kHW; ++i) {
            mpb[i] += u[i];  // used by the d post lanes of the first column block only
#pragma unroll
            for (int j = 0; j < kHW; ++j) macc[i][j] += u[i] * v[j];
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int hi = 0; hi < kHW; ++hi) {
      const int h = h0 + hi, col0 = role * kDh;
      store_rows<T, kDh, kVec>(dq[hi], 1.0f, row0, N, p.dim_k - col0, [&](int i) {
        return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, i) + p.q_off +
               h * p.head_stride + col0;
      });
    }
    if (want_mix) {
      const int base = mm == 0 ? kH * kH : 0;
      const float mul = mm == 0 ? 1.0f : scale;  // d pre: S = scale (raw + table / scale)
#pragma unroll
      for (int i = 0; i < kHW; ++i) {
#pragma unroll
        for (int j = 0; j < kHW; ++j) sums[base + (gb + i) * kH + hb + j] += macc[i][j] * mul;
        if (mm == 0 && hb == 0) sums[2 * kH * kH + gb + i] += mpb[i];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Key-major: dK and dV

template <typename T, int kH, int D, bool kVec>
__global__ void __launch_bounds__(kMixSplitThreads, 1)
    head_mix_bwd_split_kv_kernel(const WindowAttentionBackwardParams b, const float* mixed_bias, const float* dd_in) {
  using W = MixSplitWeights<kH>;
  constexpr int kHW = kH / 4;
  constexpr int kX = kMixSplitXPitch, kY = kMixSplitRows * kMixSplitYLd;
  const WindowAttentionParams& p = b.fwd;
  VF_DYNAMIC_SMEM(smem_raw);
  const MixSplitBwdLayout L = mix_split_bwd_layout(kH, D, true);
  T* k = reinterpret_cast<T*>(smem_raw + L.rows_a);
  T* v = reinterpret_cast<T*>(smem_raw + L.rows_b);
  float* xs = reinterpret_cast<float*>(smem_raw + L.xch);  // raw S^T, [head][key][query]
  float* xd = xs + kH * kX;                                 // dP'^T
  T* yp = reinterpret_cast<T*>(smem_raw + L.half);          // P'^T
  T* ya = yp + kH * kY;                                     // scale dA^T
  float* wp = reinterpret_cast<float*>(smem_raw + L.weights);
  float* stats = reinterpret_cast<float*>(smem_raw + L.stats);  // [buffer][lse, D][kH][16]
  const W mw{wp};
  const int N = p.tokens;
  const int chunks = (N + kMixSplitRows - 1) / kMixSplitRows, tiles = (N + kMixStreamKeys - 1) / kMixStreamKeys;
  const int64_t w = blockIdx.x / chunks;
  const int key0 = static_cast<int>(blockIdx.x % chunks) * kMixSplitRows;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int role = warp >> 2, h0 = (warp & 3) * kHW;  // role 0: S^T and dV, role 1: dP'^T and dK
  const int er = tid >> 4, ec = tid & 15;              // the thread's entry: key er, query ec of the tile
  const int key = key0 + er;
  const int nn = N * N;
  const float* mb = mix_stream_window_bias<kH>(mixed_bias, p, w);
  const float scale = static_cast<float>(p.scale);
  const Strides3& gs = b.grad_qkv_strides;
  const MixRows<T> q_src = mix_qkv_rows<T>(p, p.q_off, p.dim_k);
  const MixRows<T> o_src{static_cast<const T*>(b.grad_out), p.out_strides, 0, p.dim_v, p.dim_v};

  // step s: q and dO tiles (every head) of query tile s with their lse and D (plain loads, visible
  // after the barrier that opens step s, like the copies)
  auto issue = [&](int s) {
    const int buf = s & 1;
    mix_split_issue_pair<T, kH, D, kVec>(p, q_src, o_src, w, smem_raw, L.tile_a, L.tile_b, L.tile_buffer, buf,
                                         s * kMixStreamKeys);
    float* st = stats + buf * 2 * kH * kMixStreamKeys;
    for (int e = tid; e < kH * kMixStreamKeys; e += kMixSplitThreads) {
      const int h = e / kMixStreamKeys, i = s * kMixStreamKeys + (e - h * kMixStreamKeys);
      const int64_t at = (w * kH + h) * N + i;
      st[e] = i < N ? static_cast<const float*>(p.lse)[at] : 0.0f;
      st[kH * kMixStreamKeys + e] = i < N ? dd_in[at] : 0.0f;
    }
  };
  mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, mix_qkv_rows<T>(p, p.k_off, p.dim_k), w, k, 0, kH, key0,
                                                     kMixSplitRows);
  mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, mix_qkv_rows<T>(p, p.v_off, p.dim_v), w, v, 0, kH, key0,
                                                     kMixSplitRows);
  issue(0);
  cp_async_commit();
  W::fill(p, scale, wp);

  float acc[kHW][D / 8][4];  // role 0: dV, role 1: scale dK, of heads h0 ..
#pragma unroll
  for (int hi = 0; hi < kHW; ++hi) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[hi][n][0] = acc[hi][n][1] = acc[hi][n][2] = acc[hi][n][3] = 0.0f;
  }
  for (int qt = 0; qt < tiles; ++qt) {
    mix_stream_begin_step(issue, qt, tiles);
    const int buf = qt & 1;
    const T* qb = reinterpret_cast<const T*>(smem_raw + L.tile_a + buf * L.tile_buffer);
    const T* ob = reinterpret_cast<const T*>(smem_raw + L.tile_b + buf * L.tile_buffer);
    mix_split_products<T, kHW, D>(role == 0 ? k : v, role == 0 ? qb : ob, h0, role == 0 ? xs : xd, lane);
    __syncthreads();
    {
      const int query = qt * kMixStreamKeys + ec;
      const bool valid = key < N && query < N;
      const float* st = stats + buf * 2 * kH * kMixStreamKeys;
      float raw[kH], dpm[kH], pr[kH], ds[kH];
      const int at = query * N + key;
      mix_split_entry<kH>(
          mw, valid, xs, xd, er * 16 + ec, [&](int h) { return st[h * kMixStreamKeys + ec]; },
          [&](int h) { return st[(kH + h) * kMixStreamKeys + ec]; },
          [&](int g) { return mb != nullptr && valid ? __ldg(mb + g * nn + at) : 0.0f; }, raw, dpm, pr, ds);
#pragma unroll
      for (int h = 0; h < kH; ++h) {
        const float pp = valid ? mw.post_bias(h) + mw.dot(W::kPost, h, pr) : 0.0f;  // P'_h (bias inside the N x N)
        yp[h * kY + er * kMixSplitYLd + ec] = wa::from_acc<T>(pp);
        ya[h * kY + er * kMixSplitYLd + ec] = wa::from_acc<T>(mw.dot(W::kPreT, h, ds));
      }
    }
    __syncthreads();
    mix_split_accumulate<T, kHW, D, D>(acc, role == 0 ? yp : ya, role == 0 ? ob : qb, h0, 0, lane);
    __syncthreads();  // the exchanges are rewritten by the next tile; buffer qt & 1 refilled by qt + 2's issue
  }
#pragma unroll
  for (int hi = 0; hi < kHW; ++hi) {
    const int h = h0 + hi, off = role == 0 ? p.v_off : p.k_off;
    store_rows<T, D, kVec>(acc[hi], 1.0f, key0, N, role == 0 ? p.dim_v : p.dim_k, [&](int j) {
      return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + off + h * p.head_stride;
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename T, int kH, int D>
int64_t mix_split_bwd_q_blocks(const WindowAttentionBackwardParams& b) {
  if (b.grad_pre_mix == nullptr && b.dbias == nullptr) return mix_bwd_q_blocks(b, kMixSplitRows, 1);
  return mix_bwd_q_blocks(b, kMixSplitRows,
                          resident_blocks_per_sm(head_mix_bwd_split_q_kernel<T, kH, D, true>, kMixSplitThreads,
                                                 mix_split_bwd_layout(kH, D, false).total, 1));
}

template <typename T, int kH, int D>
int64_t mix_split_bwd_workspace(const WindowAttentionBackwardParams& b) {
  return mix_bwd_workspace_parts(b, kH, mix_split_bwd_q_blocks<T, kH, D>(b), kMixSplitWarps).total;
}

template <typename T, int kH, int D>
int mix_split_backward(const WindowAttentionBackwardParams& b, float* workspace, cudaStream_t stream) {
  const WindowAttentionParams& p = b.fwd;
  const bool vec = vec_ok<T>(p, b.grad_out);
  auto kq = vec ? head_mix_bwd_split_q_kernel<T, kH, D, true> : head_mix_bwd_split_q_kernel<T, kH, D, false>;
  auto kkv = vec ? head_mix_bwd_split_kv_kernel<T, kH, D, true> : head_mix_bwd_split_kv_kernel<T, kH, D, false>;
  const size_t smem_q = mix_split_bwd_layout(kH, D, false).total, smem_kv = mix_split_bwd_layout(kH, D, true).total;
  cudaError_t err = cudaFuncSetAttribute(kq, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_q));
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(kkv, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_kv));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t blocks = mix_split_bwd_q_blocks<T, kH, D>(b);
  const int64_t kv_blocks = p.windows * ((p.tokens + kMixSplitRows - 1) / kMixSplitRows);
  return mix_bwd_sequence<kH>(
      b, workspace, blocks, kMixSplitWarps, stream,
      [&](const float* bias, const float* table_bias, float* dd, float* mix, float* dtable) {
        VF_LAUNCH(kq, static_cast<unsigned>(blocks), kMixSplitThreads, smem_q, stream, b, bias, table_bias, dd, mix,
                  dtable);
        return static_cast<int>(cudaGetLastError());
      },
      [&](const float* bias, const float* dd) {
        VF_LAUNCH(kkv, static_cast<unsigned>(kv_blocks), kMixSplitThreads, smem_kv, stream, b, bias, dd);
        return static_cast<int>(cudaGetLastError());
      });
}

}  // namespace
}  // namespace vitfast
