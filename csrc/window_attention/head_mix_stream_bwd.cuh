// Head-mixing (talking-heads) attention backward for sequences -- DeiT / CaiT (N = 197, 577, ...) --
// and windows the register kernels do not take (Mini-Swin's stages 2-3), with 3, 4, 6 or 8 heads of
// <= 64 channels or 12 of <= 32 (12 of 48-64: head_mix_split_bwd.cuh, dispatched from here),
// fp16/bf16, with or without a table and a mask, on the register
// pattern of the streaming forward (head_mix_stream.cuh). Compiled in three units per 16-bit dtype
// (head_mix_stream_bwd_<dtype>_cuda.cu: the query-major kernel and the host sequence;
// head_mix_stream_bwd_kv_<dtype>_cuda.cu: the key-major kernel; head_mix_stream_bwd_h12_<dtype>_cuda.cu:
// the 12-head query-major kernel and its host sequence), so that none is the build's critical
// path; they meet through head_mix_stream_bwd_entry.h.
//
// Why: the tile backward (head_mix_bwd.cuh) measured 6.25 of DeiT-S's 8.05 ms forward+backward
// (B128 H6 N197 d64 bf16, benchmarks/RESULTS.md) against 0.64 ms for SDPA's whole step.
//
// With A_h = scale q_h k_h^T, S'_g = sum_h pre[g, h] A_h, P = softmax(S'), P'_g = sum_h post[g, h]
// P_h + post_bias[g], out_g = P'_g v_g (head_mix_bwd.cuh has the derivation):
//   dP'_g = dO_g v_g^T,  dP_h = sum_g post[g, h] dP'_g,  D_h = rowsum(P_h dP_h),
//   dS'_g = P_g (dP_g - D_g),  dA_h = sum_g pre[g, h] dS'_g,
//   dQ_h = scale dA_h k_h,  dK_h = scale dA_h^T q_h,  dV_g = P'_g^T dO_g,
//   d post[g, h] = <dP'_g, P_h>,  d post_bias[g] = <dP'_g, 1>,  d pre[g, h] = <dS'_g, A_h>.
// D is not rowsum(dO . O) here (the post mix sits between), so it takes its own pass.
//
// Kernel 1, query-major (block: 64 query rows of every head, 4 warps x 16 rows; q and dO rows
// resident, key and value tiles of 16 keys streamed by cp.async, double-buffered as in the
// forward). Every pass recomputes, per warp and key tile, the raw scores q_h k_h^T and dP'_g of
// every head in registers (two mma.sync tile sets sharing one fragment layout, so the mixes are
// per-lane arithmetic over heads):
//   pass D: D_h per row (quad-merged, to shared memory and to the workspace for kernel 2) and the
//     post-mix gradients (per-lane partials);
//   pass dpre (when mixing gradients are wanted): the pre-mix gradient (per-lane partials);
//   one pass per group of heads: dA of the group's heads, packed in registers as mma A fragments,
//     dQ_h += dA_h K_h with dQ in registers.
// The per-lane partials are reduced over the warp (butterfly) at the end of their pass and added
// to per-warp shared-memory sums; the block's sums go out once, over warps in order, and the blocks'
// in block order (window_attention_slot_reduce_kernel): bitwise reproducible.
// Kernel 2, key-major (block: 64 keys of every head, 4 warps x 16 keys; k and v rows resident,
// q and dO tiles of 16 queries streamed with their lse and D), complete per block, no atomics:
//   dV passes, one per group of heads: S^T of every head (no dP' needed), P'_h of the group per
//     lane, dV_h += P'^T_h dO_h in registers;
//   dK passes, one per group: S^T and dP'^T of every head, dA_h of the group, dK_h += dA^T_h Q_h.
// Split so, a pass holds one accumulator per head of its group instead of two: larger groups,
// fewer recomputed products (6 heads of 64: 2 + 3 passes, 48 products per tile, instead of 6
// passes of both: 72).
#pragma once

#include <utility>

#include "head_mix_split_bwd_entry.h"
#include "head_mix_stream.cuh"
#include "head_mix_stream_bwd_entry.h"

namespace vitfast {
namespace {

// f(integral_constant<int, i>) for i = 0 .. n-1: a loop whose index may pick registers (an array
// indexed by a run-time value would go to local memory; picking by selects instead spilled more).
template <typename F, int... I>
__device__ __forceinline__ void mix_static_for(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int n, typename F>
__device__ __forceinline__ void mix_static_for(F&& f) {
  mix_static_for(f, std::make_integer_sequence<int, n>{});
}

// The mixing parameters in shared memory: [pre * scale | post | post_bias], read where used
// (volatile: see the forward's weight()).
template <int kH>
struct MixStreamWeights {
  const float* w;
  __device__ __forceinline__ float at(int e) const { return *static_cast<const volatile float*>(w + e); }
  __device__ __forceinline__ float pre(int g, int h) const { return at(g * kH + h); }  // times scale
  __device__ __forceinline__ float post(int g, int h) const { return at(kH * kH + g * kH + h); }
  __device__ __forceinline__ float post_bias(int g) const { return at(2 * kH * kH + g); }
};

// One (row i, key j) entry of every head from the raw products: P_g = exp(S'_g - lse_g) (zero
// outside the N x N), dP'_g, dP_h. `lse` / `dd` read the entry's row statistics of a head.
template <int kH>
struct MixStreamEntry {
  float raw[kH], p[kH], dpm[kH], dp[kH];
  bool valid;  // inside the N x N

  // bias(g): the mixed bias M_g of the entry (table and mask; read only for a valid entry)
  template <typename Lse, typename Bias>
  __device__ __forceinline__ void compute(const MixStreamWeights<kH>& mw, bool in_range, float (&r)[kH],
                                          float (&d)[kH], Lse lse, Bias bias) {
    valid = in_range;
#pragma unroll
    for (int h = 0; h < kH; ++h) raw[h] = r[h], dpm[h] = valid ? d[h] : 0.0f;
#pragma unroll
    for (int g = 0; g < kH; ++g) {
      float x = 0.0f;
#pragma unroll
      for (int h = 0; h < kH; ++h) x += mw.pre(g, h) * raw[h];
      p[g] = valid ? wa::acc_exp(x + bias(g) - lse(g)) : 0.0f;
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

// Adds a warp's per-lane partials (n values) to its shared-memory sums: butterfly over the lanes,
// lane 0 adds. Same order every time: reproducible.
// where(e): the sum that partial e goes to (default: e).
template <int n, typename Where>
__device__ __forceinline__ void mix_stream_flush(float (&x)[n], float* sums, int lane, Where where) {
#pragma unroll
  for (int e = 0; e < n; ++e) {
    float v = x[e];
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) sums[where(e)] += v;
    x[e] = 0.0f;
  }
}
template <int n>
__device__ __forceinline__ void mix_stream_flush(float (&x)[n], float* sums, int lane) {
  mix_stream_flush<n>(x, sums, lane, [](int e) { return e; });
}

// ---------------------------------------------------------------------------------------------
// Kernel 1: D, dQ and the mixing gradients, query-major

template <typename T, int kH, int D, bool kVec>
__global__ void __launch_bounds__(kMixStreamThreads, 1)
    head_mix_bwd_stream_q_kernel(const WindowAttentionBackwardParams b, const float* mixed_bias,
                                 const float* table_bias, float* dd_out, float* mix_partials, float* dtable_slots) {
  constexpr int kG = mix_stream_bwd_q_group(kH, D), kGroups = (kH + kG - 1) / kG;
  constexpr int ld = D + 8, kTile = kMixStreamKeys * ld, kMix = 2 * kH * kH + kH;
  constexpr bool kHalves = mix_stream_bwd_halves(kH);
  constexpr int kMg = mix_stream_bwd_mix_group(kH), kMixPasses = kMg == kH ? 1 : kH / kMg;
  static_assert(kH % kMg == 0, "mixing-gradient groups must tile the heads");
  const WindowAttentionParams& p = b.fwd;
  VF_DYNAMIC_SMEM(smem_raw);
  const MixStreamBwdLayout L = mix_stream_bwd_layout(kH, D);
  T* q = reinterpret_cast<T*>(smem_raw + L.rows_a);
  T* dout = reinterpret_cast<T*>(smem_raw + L.rows_b);
  float* mwp = reinterpret_cast<float*>(smem_raw + L.weights);
  float* lse_rows = reinterpret_cast<float*>(smem_raw + L.stats);  // [64 rows][kH]
  float* dd_rows = lse_rows + kMixStreamRows * kH;                   // [64 rows][kH]
  const MixStreamWeights<kH> mw{mwp};
  const int N = p.tokens;
  const int chunks = (N + kMixStreamRows - 1) / kMixStreamRows, tiles = (N + kMixStreamKeys - 1) / kMixStreamKeys;
  const int64_t items = p.windows * chunks;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const bool want_mix = mix_partials != nullptr;
  const int passes = 1 + (want_mix ? kMixPasses : 0) + kGroups;
  const int steps = passes * tiles;
  const float scale = static_cast<float>(p.scale);
  const Strides3& gs = b.grad_qkv_strides;
  const MixRows<T> k_src = mix_qkv_rows<T>(p, p.k_off, p.dim_k), v_src = mix_qkv_rows<T>(p, p.v_off, p.dim_v);
  const MixRows<T> q_src = mix_qkv_rows<T>(p, p.q_off, p.dim_k);
  const MixRows<T> o_src{static_cast<const T*>(b.grad_out), p.out_strides, 0, p.dim_v, p.dim_v};

  for (int e = threadIdx.x; e < kMix; e += kMixStreamThreads) mwp[e] = MixRegWeights<kH>::mix_weight(p, scale, e);
  // each warp's mixing-gradient sums [pre | post | post_bias] over the block's items, added to by
  // its lane 0 in the workspace (kMix more registers would not fit; a few adds per pass)
  float* sums = want_mix ? mix_partials + static_cast<int64_t>(blockIdx.x) * kMixStreamWarps * kMix + warp * kMix
                         : nullptr;
  if (want_mix && lane == 0)
    for (int e = 0; e < kMix; ++e) sums[e] = 0.0f;
  // the block's table-gradient sums (heads x N x N) over its items: entry (h, i, j) is always
  // added to by the same thread (the lane that holds row i, key j), so plain adds in item order
  const int nn = N * N;  // 32-bit offsets within a window's heads x N x N (N <= 4096, heads <= 32)
  float* dtable = dtable_slots != nullptr ? dtable_slots + static_cast<int64_t>(blockIdx.x) * kH * nn : nullptr;
  if (dtable != nullptr)
    for (int e = threadIdx.x; e < kH * nn; e += kMixStreamThreads) dtable[e] = 0.0f;  // before the first item's barrier
  const float inv_scale = 1.0f / scale;  // dtable takes dA_h, the kernel's dA carries the scale

  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t w = item / chunks;
    const int row0 = static_cast<int>(item % chunks) * kMixStreamRows;
    const int q0 = row0 + warp * 16;
    const bool active = q0 < N;
    const int rows[2] = {q0 + g, q0 + g + 8};
    const float* mb = mix_stream_window_bias<kH>(mixed_bias, p, w);

    // step s: key and value tiles (every head) of key tile s % tiles
    auto issue = [&](int s) {
      const int kt = s % tiles, buf = s & 1;
      mix_stream_issue<T, kH, D, kVec>(p, k_src, w, reinterpret_cast<T*>(smem_raw + L.tile_a + buf * L.tile_buffer), 0,
                                       kH, kt * kMixStreamKeys, kMixStreamKeys);
      mix_stream_issue<T, kH, D, kVec>(p, v_src, w, reinterpret_cast<T*>(smem_raw + L.tile_b + buf * L.tile_buffer), 0,
                                       kH, kt * kMixStreamKeys, kMixStreamKeys);
    };
    __syncthreads();  // the previous item's last readers of every buffer are done
    mix_stream_issue<T, kH, D, kVec>(p, q_src, w, q, 0, kH, row0, kMixStreamRows);
    mix_stream_issue<T, kH, D, kVec>(p, o_src, w, dout, 0, kH, row0, kMixStreamRows);
    issue(0);
    cp_async_commit();
    for (int e = threadIdx.x; e < kMixStreamRows * kH; e += kMixStreamThreads) {
      const int r = e / kH, h = e - r * kH;
      lse_rows[e] = row0 + r < N ? static_cast<const float*>(p.lse)[(w * kH + h) * N + row0 + r] : 0.0f;
    }
    auto begin_step = [&](int s) { mix_stream_begin_step(issue, s, steps); };
    const float* my_lse = lse_rows + warp * 16 * kH;
    float* my_dd = dd_rows + warp * 16 * kH;
    auto lse_at = [&](int h, int r) -> float { return *static_cast<const volatile float*>(my_lse + (g + 8 * r) * kH + h); };
    auto dd_at = [&](int h, int r) -> float { return *static_cast<const volatile float*>(my_dd + (g + 8 * r) * kH + h); };
    // the raw scores and dP' of key tile kt (buffer buf) for the warp's rows, every head
    auto products = [&](int buf, float (&sc)[kH][2][4], float (&dpc)[kH][2][4]) {
      mix_stream_products<T, kH, D>(q, warp * 16, reinterpret_cast<const T*>(smem_raw + L.tile_a + buf * L.tile_buffer),
                                    lane, sc);
      mix_stream_products<T, kH, D>(dout, warp * 16,
                                    reinterpret_cast<const T*>(smem_raw + L.tile_b + buf * L.tile_buffer), lane, dpc);
    };
    auto key_at = [&](int kt, int j, int e) { return kt * kMixStreamKeys + 8 * j + 2 * t + (e & 1); };
    auto valid_at = [&](int kt, int j, int e) { return rows[e >> 1] < N && key_at(kt, j, e) < N; };

    int step = 0;
    // entry e of half j of key tile kt from the raw products of every head: body(kt, j, e, entry)
    // (entry: P, dP', dP of every head)
    auto visit = [&](int kt, int j, int e, float (&r)[kH], float (&d)[kH], auto&& body) {
      MixStreamEntry<kH> en;
      const int at = rows[e >> 1] * N + key_at(kt, j, e);
      en.compute(mw, valid_at(kt, j, e), r, d, [&](int h) { return lse_at(h, e >> 1); },
                 [&](int gg) { return mb != nullptr ? __ldg(mb + gg * nn + at) : 0.0f; });
      body(kt, j, e, en);
    };
    // One pass over the key tiles: per tile, both products of every head (12 heads: per 8-key half),
    // then body for each of the lane's 8 entries, then tile_done(buffer) for the tile's own products.
    auto pass = [&](auto&& body, auto&& tile_done) {
      for (int kt = 0; kt < tiles; ++kt, ++step) {
        begin_step(step);
        if (active) {
          const int buf = step & 1;
          if constexpr (kHalves) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              float sc[kH][4], dpc[kH][4];
              mix_stream_products_half<T, kH, D>(q, warp * 16, reinterpret_cast<const T*>(smem_raw + L.tile_a + buf * L.tile_buffer),
                                                 lane, j, sc);
              mix_stream_products_half<T, kH, D>(dout, warp * 16,
                                                 reinterpret_cast<const T*>(smem_raw + L.tile_b + buf * L.tile_buffer), lane,
                                                 j, dpc);
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                float r[kH], d[kH];
#pragma unroll
                for (int h = 0; h < kH; ++h) r[h] = sc[h][e], d[h] = dpc[h][e];
                visit(kt, j, e, r, d, body);
              }
            }
          } else {
            float sc[kH][2][4], dpc[kH][2][4];
            products(buf, sc, dpc);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                float r[kH], d[kH];
#pragma unroll
                for (int h = 0; h < kH; ++h) r[h] = sc[h][j][e], d[h] = dpc[h][j][e];
                visit(kt, j, e, r, d, body);
              }
            }
          }
          tile_done(buf);
        }
        __syncthreads();  // buffer step & 1 is refilled by the issue of step + 2
      }
    };
    auto no_products = [](int) {};

    // pass D: D_h = rowsum(P_h dP_h); below 12 heads d post and d post_bias too
    {
      constexpr bool kPost = kMg == kH;
      float dpart[kH][2] = {};
      float gpost[kPost ? kH * kH + kH : 1] = {};
      pass(
          [&](int, int, int e, const MixStreamEntry<kH>& en) {
#pragma unroll
            for (int h = 0; h < kH; ++h) dpart[h][e >> 1] += en.p[h] * en.dp[h];
            if constexpr (kPost) {
              if (want_mix) {
#pragma unroll
                for (int gg = 0; gg < kH; ++gg) {
#pragma unroll
                  for (int h = 0; h < kH; ++h) gpost[gg * kH + h] += en.dpm[gg] * en.p[h];
                  gpost[kH * kH + gg] += en.dpm[gg];
                }
              }
            }
          },
          no_products);
      if (active) {
#pragma unroll
        for (int h = 0; h < kH; ++h) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float x = dpart[h][r];
            x += __shfl_xor_sync(0xffffffffu, x, 1);
            x += __shfl_xor_sync(0xffffffffu, x, 2);
            if (t == 0) {
              my_dd[(g + 8 * r) * kH + h] = x;  // read by the warp after the next barrier
              if (rows[r] < N) dd_out[(w * kH + h) * N + rows[r]] = x;
            }
          }
        }
        if constexpr (kPost) {
          if (want_mix) mix_stream_flush<kH * kH + kH>(gpost, sums + kH * kH, lane);
        }
      }
    }

    // pass dpre: d pre[g, h] = sum dS'_g S_h with S_h = scale raw_h + table_h (the scale at the
    // end); at 12 heads one pass per group of kMg heads G: d pre[G, :], and (pass D had no room for
    // them) the columns d post[:, G] = sum dP'_: P_G and d post_bias[G]. By columns, not rows: a
    // pass then needs P and dP of its own heads only (the compiler drops the other heads' mixes
    // and exps: ~100 FMA per entry instead of ~350). The passes are unrolled so that the group's
    // heads index registers (the 12-head query-major kernel has its own unit per dtype,
    // head_mix_stream_bwd_h12_<dtype>_cuda.cu: these copies double its compile time).
    if (want_mix) {
      mix_static_for<kMixPasses>([&](auto pass_index) {
        constexpr int g0 = decltype(pass_index)::value * kMg;
        constexpr bool kPost = kMg != kH;
        float gpre[kMg * kH] = {};
        [[maybe_unused]] float gpost[kPost ? kMg * kH : 1] = {}, gpb[kPost ? kMg : 1] = {};  // kPost only
        pass(
            [&](int kt, int j, int e, const MixStreamEntry<kH>& en) {
              float sh[kH];
#pragma unroll
              for (int h = 0; h < kH; ++h) sh[h] = en.raw[h];
              if (table_bias != nullptr && en.valid) {
                const int at = rows[e >> 1] * N + key_at(kt, j, e);
#pragma unroll
                for (int h = 0; h < kH; ++h) sh[h] += inv_scale * __ldg(table_bias + h * nn + at);
              }
#pragma unroll
              for (int gi = 0; gi < kMg; ++gi) {
                const int gg = g0 + gi;
                const float ds = en.p[gg] * (en.dp[gg] - dd_at(gg, e >> 1));
#pragma unroll
                for (int h = 0; h < kH; ++h) gpre[gi * kH + h] += ds * sh[h];
                if constexpr (kPost) {
#pragma unroll
                  for (int g2 = 0; g2 < kH; ++g2) gpost[gi * kH + g2] += en.dpm[g2] * en.p[gg];  // d post[g2, gg]
                  gpb[gi] += en.dpm[gg];
                }
              }
            },
            no_products);
        if (active) {
#pragma unroll
          for (int e = 0; e < kMg * kH; ++e) gpre[e] *= scale;
          mix_stream_flush<kMg * kH>(gpre, sums + g0 * kH, lane);
          if constexpr (kPost) {
            mix_stream_flush<kMg * kH>(gpost, sums + kH * kH, lane, [](int e) {
              return (e % kH) * kH + g0 + e / kH;  // gpost[gi * kH + g2] is d post[g2, g0 + gi]
            });
            mix_stream_flush<kMg>(gpb, sums + 2 * kH * kH + g0, lane);
          }
        }
      });
    }

    // one pass per group of heads: dQ_h += (scale dA_h) K_h (pre carries the scale)
    for (int c0 = 0; c0 < kH; c0 += kG) {
      float dq[kG][D / 8][4];
#pragma unroll
      for (int gi = 0; gi < kG; ++gi) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n) dq[gi][n][0] = dq[gi][n][1] = dq[gi][n][2] = dq[gi][n][3] = 0.0f;
      }
      float da[kG][2][4];
      pass(
          [&](int kt, int j, int e, const MixStreamEntry<kH>& en) {
            float ds[kH];
#pragma unroll
            for (int gg = 0; gg < kH; ++gg) ds[gg] = en.p[gg] * (en.dp[gg] - dd_at(gg, e >> 1));
#pragma unroll
            for (int gi = 0; gi < kG; ++gi) {
              const int h = c0 + gi;
              float x = 0.0f;
              if (h < kH) {
#pragma unroll
                for (int gg = 0; gg < kH; ++gg) x += mw.pre(gg, h) * ds[gg];
              }
              da[gi][j][e] = x;
              if (dtable != nullptr && en.valid && h < kH)
                dtable[h * nn + rows[e >> 1] * N + key_at(kt, j, e)] += x * inv_scale;
            }
          },
          [&](int buf) {
            const T* kb = reinterpret_cast<const T*>(smem_raw + L.tile_a + buf * L.tile_buffer);
#pragma unroll
            for (int gi = 0; gi < kG; ++gi) {
              if (c0 + gi >= kH) continue;
              uint32_t a[4];
              c_tiles_to_a<T>(da[gi][0], da[gi][1], a);
              mma_times_rows<T, D>(dq[gi], a, kb + (c0 + gi) * kTile, ld, lane);
            }
          });
      if (active) {
#pragma unroll
        for (int gi = 0; gi < kG; ++gi) {
          const int h = c0 + gi;
          if (h >= kH) continue;
          store_rows<T, D, kVec>(dq[gi], 1.0f, q0, N, p.dim_k, [&](int i) {
            return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, i) + p.q_off +
                   h * p.head_stride;
          });
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: dK and dV, key-major

template <typename T, int kH, int D, bool kVec>
__global__ void __launch_bounds__(kMixStreamThreads, 1)
    head_mix_bwd_stream_kv_kernel(const WindowAttentionBackwardParams b, const float* mixed_bias, const float* dd_in) {
  // dV passes need the scores only (P'_h from P of every head); dK passes both products
  constexpr int kGv = mix_stream_bwd_v_group(kH, D), kGk = mix_stream_bwd_k_group(kH, D);
  constexpr int kVPasses = (kH + kGv - 1) / kGv, kKPasses = (kH + kGk - 1) / kGk;
  constexpr int ld = D + 8, kTile = kMixStreamKeys * ld, kMix = 2 * kH * kH + kH;
  constexpr bool kHalves = mix_stream_bwd_halves(kH);
  const WindowAttentionParams& p = b.fwd;
  VF_DYNAMIC_SMEM(smem_raw);
  const MixStreamBwdLayout L = mix_stream_bwd_layout(kH, D);
  T* k = reinterpret_cast<T*>(smem_raw + L.rows_a);
  T* v = reinterpret_cast<T*>(smem_raw + L.rows_b);
  float* mwp = reinterpret_cast<float*>(smem_raw + L.weights);
  float* stats = reinterpret_cast<float*>(smem_raw + L.stats);  // [buffer][lse, D][kH][16]
  const MixStreamWeights<kH> mw{mwp};
  const int N = p.tokens;
  const int chunks = (N + kMixStreamRows - 1) / kMixStreamRows, tiles = (N + kMixStreamKeys - 1) / kMixStreamKeys;
  const int64_t w = blockIdx.x / chunks;
  const int key0 = static_cast<int>(blockIdx.x % chunks) * kMixStreamRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int j0 = key0 + warp * 16;
  const bool active = j0 < N;
  const int steps = (kVPasses + kKPasses) * tiles;
  const int nn = N * N;
  const float* mb = mix_stream_window_bias<kH>(mixed_bias, p, w);
  // the mixed bias of entry (n, e) of query tile qt, head g (valid entries only)
  auto bias_at = [&](int qt, int n, int e, int gg) {
    const int at = (qt * kMixStreamKeys + 8 * n + 2 * t + (e & 1)) * N + j0 + g + 8 * (e >> 1);
    return mb != nullptr ? __ldg(mb + gg * nn + at) : 0.0f;
  };
  const float scale = static_cast<float>(p.scale);
  const Strides3& gs = b.grad_qkv_strides;
  const MixRows<T> q_src = mix_qkv_rows<T>(p, p.q_off, p.dim_k);
  const MixRows<T> o_src{static_cast<const T*>(b.grad_out), p.out_strides, 0, p.dim_v, p.dim_v};

  // step s: q and dO tiles (every head) of query tile s % tiles, with their lse and D (plain loads:
  // visible after the barrier that opens step s, like the copies). The dV passes read q, dO and lse.
  auto issue = [&](int s) {
    const int qt = s % tiles, buf = s & 1;
    mix_stream_issue<T, kH, D, kVec>(p, q_src, w, reinterpret_cast<T*>(smem_raw + L.tile_a + buf * L.tile_buffer), 0,
                                     kH, qt * kMixStreamKeys, kMixStreamKeys);
    mix_stream_issue<T, kH, D, kVec>(p, o_src, w, reinterpret_cast<T*>(smem_raw + L.tile_b + buf * L.tile_buffer), 0,
                                     kH, qt * kMixStreamKeys, kMixStreamKeys);
    float* st = stats + buf * 2 * kH * kMixStreamKeys;
    for (int e = threadIdx.x; e < kH * kMixStreamKeys; e += kMixStreamThreads) {
      const int h = e / kMixStreamKeys, i = qt * kMixStreamKeys + (e - h * kMixStreamKeys);
      const int64_t at = (w * kH + h) * N + i;
      st[e] = i < N ? static_cast<const float*>(p.lse)[at] : 0.0f;
      st[kH * kMixStreamKeys + e] = i < N ? dd_in[at] : 0.0f;
    }
  };
  mix_stream_issue<T, kH, D, kVec>(p, mix_qkv_rows<T>(p, p.k_off, p.dim_k), w, k, 0, kH, key0, kMixStreamRows);
  mix_stream_issue<T, kH, D, kVec>(p, mix_qkv_rows<T>(p, p.v_off, p.dim_v), w, v, 0, kH, key0, kMixStreamRows);
  issue(0);
  cp_async_commit();
  for (int e = threadIdx.x; e < kMix; e += kMixStreamThreads) mwp[e] = MixRegWeights<kH>::mix_weight(p, scale, e);
  auto begin_step = [&](int s) { mix_stream_begin_step(issue, s, steps); };
  // S^T_h = K_h Q_h^T (and dP'^T_g = V_g dO_g^T): entry (n, e) is key j0 + g + 8 (e >> 1), query
  // 16 qt + 8 n + 2 t + (e & 1), at il = 8 n + 2 t + (e & 1) in the tile
  auto valid_at = [&](int qt, int n, int e) {
    return qt * kMixStreamKeys + 8 * n + 2 * t + (e & 1) < N && j0 + g + 8 * (e >> 1) < N;
  };
  auto store = [&](const float (&acc)[D / 8][4], int h, int off, int dim) {
    store_rows<T, D, kVec>(acc, 1.0f, j0, N, dim, [&](int j) {
      return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + off + h * p.head_stride;
    });
  };

  int step = 0;
  // dV passes: P_g = exp(S'_g - lse_g) of every head, P'_h of the group, dV_h += P'^T_h dO_h
  for (int c0 = 0; c0 < kH; c0 += kGv) {
    float dv[kGv][D / 8][4];
#pragma unroll
    for (int gi = 0; gi < kGv; ++gi) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) dv[gi][n][0] = dv[gi][n][1] = dv[gi][n][2] = dv[gi][n][3] = 0.0f;
    }
    for (int qt = 0; qt < tiles; ++qt, ++step) {
      begin_step(step);
      if (active) {
        const int buf = step & 1;
        const T* qb = reinterpret_cast<const T*>(smem_raw + L.tile_a + buf * L.tile_buffer);
        const T* ob = reinterpret_cast<const T*>(smem_raw + L.tile_b + buf * L.tile_buffer);
        const float* st = stats + buf * 2 * kH * kMixStreamKeys;
        float pp[kGv][2][4];
        // P'_h of the group at entry e of query half n, from the raw scores of every head
        auto entry = [&](int n, int e, const float (&r)[kH]) {
          const int il = 8 * n + 2 * t + (e & 1);
          const bool valid = valid_at(qt, n, e);
          float pr[kH];
#pragma unroll
          for (int gg = 0; gg < kH; ++gg) {
            float x = 0.0f;
#pragma unroll
            for (int h = 0; h < kH; ++h) x += mw.pre(gg, h) * r[h];
            pr[gg] = valid ? wa::acc_exp(x + bias_at(qt, n, e, gg) - st[gg * kMixStreamKeys + il]) : 0.0f;
          }
#pragma unroll
          for (int gi = 0; gi < kGv; ++gi) {
            const int h = c0 + gi;
            float x = 0.0f;
            if (h < kH) {
              x = mw.post_bias(h);
#pragma unroll
              for (int gg = 0; gg < kH; ++gg) x += mw.post(h, gg) * pr[gg];
            }
            pp[gi][n][e] = valid ? x : 0.0f;  // P'_h (the post bias only inside the N x N)
          }
        };
        if constexpr (kHalves) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            float sc[kH][4];
            mix_stream_products_half<T, kH, D>(k, warp * 16, qb, lane, n, sc);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float r[kH];
#pragma unroll
              for (int h = 0; h < kH; ++h) r[h] = sc[h][e];
              entry(n, e, r);
            }
          }
        } else {
          float sc[kH][2][4];
          mix_stream_products<T, kH, D>(k, warp * 16, qb, lane, sc);
#pragma unroll
          for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float r[kH];
#pragma unroll
              for (int h = 0; h < kH; ++h) r[h] = sc[h][n][e];
              entry(n, e, r);
            }
          }
        }
#pragma unroll
        for (int gi = 0; gi < kGv; ++gi) {
          if (c0 + gi >= kH) continue;
          uint32_t a[4];
          c_tiles_to_a<T>(pp[gi][0], pp[gi][1], a);
          mma_times_rows<T, D>(dv[gi], a, ob + (c0 + gi) * kTile, ld, lane);
        }
      }
      __syncthreads();  // buffer step & 1 is refilled by the issue of step + 2
    }
    if (active) {
#pragma unroll
      for (int gi = 0; gi < kGv; ++gi)
        if (c0 + gi < kH) store(dv[gi], c0 + gi, p.v_off, p.dim_v);
    }
  }

  // dK passes: dS'_g = P_g (dP_g - D_g) of every head, dA_h of the group (pre carries the
  // scale), dK_h += (scale dA_h)^T Q_h
  for (int c0 = 0; c0 < kH; c0 += kGk) {
    float dk[kGk][D / 8][4];
#pragma unroll
    for (int gi = 0; gi < kGk; ++gi) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n) dk[gi][n][0] = dk[gi][n][1] = dk[gi][n][2] = dk[gi][n][3] = 0.0f;
    }
    for (int qt = 0; qt < tiles; ++qt, ++step) {
      begin_step(step);
      if (active) {
        const int buf = step & 1;
        const T* qb = reinterpret_cast<const T*>(smem_raw + L.tile_a + buf * L.tile_buffer);
        const T* ob = reinterpret_cast<const T*>(smem_raw + L.tile_b + buf * L.tile_buffer);
        const float* st = stats + buf * 2 * kH * kMixStreamKeys;
        float da[kGk][2][4];
        // scale dA_h of the group at entry e of query half n, from both raw products of every head
        auto entry = [&](int n, int e, float (&r)[kH], float (&d)[kH]) {
          const int il = 8 * n + 2 * t + (e & 1);
          MixStreamEntry<kH> en;
          en.compute(mw, valid_at(qt, n, e), r, d, [&](int h) { return st[h * kMixStreamKeys + il]; },
                     [&](int gg) { return bias_at(qt, n, e, gg); });
          float ds[kH];
#pragma unroll
          for (int gg = 0; gg < kH; ++gg) ds[gg] = en.p[gg] * (en.dp[gg] - st[(kH + gg) * kMixStreamKeys + il]);
#pragma unroll
          for (int gi = 0; gi < kGk; ++gi) {
            const int h = c0 + gi;
            float y = 0.0f;
            if (h < kH) {
#pragma unroll
              for (int gg = 0; gg < kH; ++gg) y += mw.pre(gg, h) * ds[gg];
            }
            da[gi][n][e] = y;  // scale dA_h (zero outside the N x N: P is)
          }
        };
        if constexpr (kHalves) {
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            float sc[kH][4], dpc[kH][4];
            mix_stream_products_half<T, kH, D>(k, warp * 16, qb, lane, n, sc);
            mix_stream_products_half<T, kH, D>(v, warp * 16, ob, lane, n, dpc);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float r[kH], d[kH];
#pragma unroll
              for (int h = 0; h < kH; ++h) r[h] = sc[h][e], d[h] = dpc[h][e];
              entry(n, e, r, d);
            }
          }
        } else {
          float sc[kH][2][4], dpc[kH][2][4];
          mix_stream_products<T, kH, D>(k, warp * 16, qb, lane, sc);
          mix_stream_products<T, kH, D>(v, warp * 16, ob, lane, dpc);
#pragma unroll
          for (int n = 0; n < 2; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float r[kH], d[kH];
#pragma unroll
              for (int h = 0; h < kH; ++h) r[h] = sc[h][n][e], d[h] = dpc[h][n][e];
              entry(n, e, r, d);
            }
          }
        }
#pragma unroll
        for (int gi = 0; gi < kGk; ++gi) {
          if (c0 + gi >= kH) continue;
          uint32_t a[4];
          c_tiles_to_a<T>(da[gi][0], da[gi][1], a);
          mma_times_rows<T, D>(dk[gi], a, qb + (c0 + gi) * kTile, ld, lane);
        }
      }
      __syncthreads();
    }
    if (active) {
#pragma unroll
      for (int gi = 0; gi < kGk; ++gi)
        if (c0 + gi < kH) store(dk[gi], c0 + gi, p.k_off, p.dim_k);
    }
  }
}

// Sums each block's per-warp mixing-gradient sums in warp order: (blocks, warps, kMix) -> (blocks,
// kMix), after them in the workspace (the slot reduction then adds the blocks in order).
__global__ void mix_stream_warp_sum_kernel(float* partials, int64_t blocks, int mix, int warps) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= blocks * mix) return;
  const int64_t blk = e / mix;
  const int m = static_cast<int>(e - blk * mix);
  const float* src = partials + blk * warps * mix + m;
  float x = 0.0f;
  for (int u = 0; u < warps; ++u) x += src[u * mix];
  partials[static_cast<int64_t>(blocks) * warps * mix + e] = x;
}

// ---------------------------------------------------------------------------------------------
// Host side, shared with the head-split kernels (head_mix_split_bwd.cuh)

// Blocks of a query-major kernel: one per item (window, chunk of `rows` rows), or one wave of
// resident blocks (per_sm per SM, each looping over items) when it sums the mixing or table
// gradients, so that their partials stay few.
inline int64_t mix_bwd_q_blocks(const WindowAttentionBackwardParams& b, int rows, int per_sm) {
  const WindowAttentionParams& p = b.fwd;
  const int64_t items = p.windows * ((p.tokens + rows - 1) / rows);
  if (b.grad_pre_mix == nullptr && b.dbias == nullptr) return items;
  return std::max<int64_t>(1, std::min<int64_t>(items, static_cast<int64_t>(per_sm) * device_sms()));
}

template <typename T, int kH, int D>
int64_t mix_stream_bwd_q_blocks(const WindowAttentionBackwardParams& b) {
  if (b.grad_pre_mix == nullptr && b.dbias == nullptr) return mix_bwd_q_blocks(b, kMixStreamRows, 1);
  return mix_bwd_q_blocks(b, kMixStreamRows,
                          resident_blocks_per_sm(head_mix_bwd_stream_q_kernel<T, kH, D, true>, kMixStreamThreads,
                                                 mix_stream_bwd_layout(kH, D).total, 1));
}

// Workspace (floats), each part from a multiple of 64: D (windows x heads x N) | the mixed bias
// (table and mask, as the forward's) | the unmixed table bias (heads x N x N, for d pre; none when
// the glue gave its (heads, N, N) table buffer, p.bias_buffer, which is filled instead) |
// per-warp mixing sums (blocks x warps x kMix) and per-block sums (blocks x kMix) | table-gradient
// sums (blocks x heads x N x N).
struct MixStreamBwdWorkspace {
  int64_t dd = 0, bias = 0, table_bias = 0, mix = 0, table = 0, total = 0;
};

inline MixStreamBwdWorkspace mix_bwd_workspace_parts(const WindowAttentionBackwardParams& b, int heads, int64_t blocks,
                                                     int warps) {
  const WindowAttentionParams& p = b.fwd;
  MixStreamBwdWorkspace ws;
  int64_t end = round64(p.windows * heads * static_cast<int64_t>(p.tokens));
  ws.bias = end;
  end += round64(mix_stream_bias_floats(p));
  ws.table_bias = end;
  if (p.table != nullptr && b.grad_pre_mix != nullptr && p.bias_buffer == nullptr)
    end += round64(heads * static_cast<int64_t>(p.tokens) * p.tokens);
  ws.mix = end;
  if (b.grad_pre_mix != nullptr) end += round64(blocks * (warps + 1) * (2 * heads * heads + heads));
  ws.table = end;
  if (b.dbias != nullptr) end += blocks * heads * static_cast<int64_t>(p.tokens) * p.tokens;
  ws.total = end;
  return ws;
}

template <typename T, int kH, int D>
int64_t mix_stream_bwd_workspace(const WindowAttentionBackwardParams& b) {
  return mix_bwd_workspace_parts(b, kH, mix_stream_bwd_q_blocks<T, kH, D>(b), kMixStreamWarps).total;
}

// The host sequence of a streaming backward: the mixed bias and the unmixed table bias rebuilt
// into the workspace, launch_q(bias, table_bias, dd, mix, dtable) for the query-major kernel
// (`blocks` blocks of `warps` warps), launch_kv(bias, dd) for the key-major one, then the
// table-gradient and mixing-gradient reductions in a fixed order.
template <int kH, typename LaunchQ, typename LaunchKv>
int mix_bwd_sequence(const WindowAttentionBackwardParams& b, float* workspace, int64_t blocks, int warps,
                     cudaStream_t stream, LaunchQ&& launch_q, LaunchKv&& launch_kv) {
  const WindowAttentionParams& p = b.fwd;
  constexpr int kMix = 2 * kH * kH + kH, kThreads = 256;
  const MixStreamBwdWorkspace ws = mix_bwd_workspace_parts(b, kH, blocks, warps);
  float* dd = workspace;
  float* bias = mix_stream_bias_floats(p) > 0 ? workspace + ws.bias : nullptr;
  float* mix = b.grad_pre_mix != nullptr ? workspace + ws.mix : nullptr;
  float* dtable = b.dbias != nullptr ? workspace + ws.table : nullptr;
  float* table_bias = nullptr;
  if (bias != nullptr) {  // the forward's mixed bias, rebuilt (the forward's workspace is gone)
    auto fill = head_mix_reg_bias_kernel<kH>;
    VF_LAUNCH(fill, blocks_for(mix_stream_bias_floats(p), kThreads), kThreads, 0, stream, p, bias);
  }
  if (p.table != nullptr && mix != nullptr) {  // the unmixed table bias (heads x N x N), which d pre needs
    WindowAttentionParams into = p;
    if (into.bias_buffer == nullptr) into.bias_buffer = workspace + ws.table_bias;
    table_bias = static_cast<float*>(into.bias_buffer);
    auto fill = head_mix_table_kernel<float>;
    VF_LAUNCH(fill, blocks_for(kH * static_cast<int64_t>(p.tokens) * p.tokens, kThreads), kThreads, 0, stream, into);
  }
  cudaError_t err = static_cast<cudaError_t>(
      launch_q(static_cast<const float*>(bias), static_cast<const float*>(table_bias), dd, mix, dtable));
  if (err != cudaSuccess) return static_cast<int>(err);
  err = static_cast<cudaError_t>(launch_kv(static_cast<const float*>(bias), static_cast<const float*>(dd)));
  if (err != cudaSuccess) return static_cast<int>(err);
  if (dtable != nullptr) {
    const int64_t per_block = kH * static_cast<int64_t>(p.tokens) * p.tokens;
    auto reduce = window_attention_slot_reduce_kernel<float>;
    VF_LAUNCH(reduce, blocks_for(per_block, kThreads), kThreads, 0, stream, static_cast<const float*>(dtable), blocks,
              per_block, static_cast<float*>(b.dbias));
  }
  if (mix != nullptr) {
    auto sum_warps = mix_stream_warp_sum_kernel;
    VF_LAUNCH(sum_warps, blocks_for(blocks * kMix, kThreads), kThreads, 0, stream, mix, blocks, kMix, warps);
    auto reduce = window_attention_slot_reduce_kernel<float>;
    VF_LAUNCH(reduce, blocks_for(kMix, kThreads), kThreads, 0, stream,
              static_cast<const float*>(mix + blocks * warps * kMix), blocks, static_cast<int64_t>(kMix),
              static_cast<float*>(b.grad_pre_mix));
  }
  return static_cast<int>(cudaGetLastError());
}

// The key-major kernel (its own unit, head_mix_stream_bwd_kv_<dtype>_cuda.cu).
template <typename T, int kH, int D>
int mix_stream_backward_kv(const WindowAttentionBackwardParams& b, const float* bias, const float* dd,
                           cudaStream_t stream) {
  const WindowAttentionParams& p = b.fwd;
  auto kkv = vec_ok<T>(p, b.grad_out) ? head_mix_bwd_stream_kv_kernel<T, kH, D, true>
                                      : head_mix_bwd_stream_kv_kernel<T, kH, D, false>;
  const size_t smem = mix_stream_bwd_layout(kH, D).total;
  const cudaError_t err = cudaFuncSetAttribute(kkv, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t items = p.windows * ((p.tokens + kMixStreamRows - 1) / kMixStreamRows);
  VF_LAUNCH(kkv, static_cast<unsigned>(items), kMixStreamThreads, smem, stream, b, bias, dd);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int mix_stream_launch_kv(const WindowAttentionBackwardParams& b, const float* bias, const float* dd,
                         cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __half>) return head_mix_stream_bwd_kv_launch_f16(b, bias, dd, stream);
  else return head_mix_stream_bwd_kv_launch_bf16(b, bias, dd, stream);
}

template <typename T, int kH, int D>
int mix_stream_backward(const WindowAttentionBackwardParams& b, float* workspace, cudaStream_t stream) {
  const WindowAttentionParams& p = b.fwd;
  auto kq = vec_ok<T>(p, b.grad_out) ? head_mix_bwd_stream_q_kernel<T, kH, D, true>
                                     : head_mix_bwd_stream_q_kernel<T, kH, D, false>;
  const size_t smem = mix_stream_bwd_layout(kH, D).total;
  const cudaError_t err = cudaFuncSetAttribute(kq, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t blocks = mix_stream_bwd_q_blocks<T, kH, D>(b);
  return mix_bwd_sequence<kH>(
      b, workspace, blocks, kMixStreamWarps, stream,
      [&](const float* bias, const float* table_bias, float* dd, float* mix, float* dtable) {
        VF_LAUNCH(kq, static_cast<unsigned>(blocks), kMixStreamThreads, smem, stream, b, bias, table_bias, dd, mix,
                  dtable);
        return static_cast<int>(cudaGetLastError());
      },
      [&](const float* bias, const float* dd) { return mix_stream_launch_kv<T>(b, bias, dd, stream); });
}

template <typename F>
auto with_mix_stream_bwd_shape(const WindowAttentionParams& p, F&& f) {
  auto by_dim = [&](auto h) {
    return mix_stream_dim(p.dim_k, p.dim_v) == 32 ? f(h, std::integral_constant<int, 32>{})
                                                  : f(h, std::integral_constant<int, 64>{});
  };
  switch (p.heads) {
    case 3: return by_dim(std::integral_constant<int, 3>{});
    case 4: return by_dim(std::integral_constant<int, 4>{});
    case 6: return by_dim(std::integral_constant<int, 6>{});
    case 8: return by_dim(std::integral_constant<int, 8>{});
    default: return f(std::integral_constant<int, 12>{}, std::integral_constant<int, 32>{});  // 12 of 64: head_mix_split_bwd.cuh
  }
}

// 12 heads: the query-major kernel's own unit (head_mix_stream_bwd_h12_<dtype>_cuda.cu)
template <typename T>
int64_t mix_stream_h12_workspace(const WindowAttentionBackwardParams& b) {
  if constexpr (std::is_same_v<T, __half>) return head_mix_stream_bwd_h12_workspace_f16(b);
  else return head_mix_stream_bwd_h12_workspace_bf16(b);
}
template <typename T>
int mix_stream_h12_launch(const WindowAttentionBackwardParams& b, void* workspace, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __half>) return head_mix_stream_bwd_h12_launch_f16(b, workspace, stream);
  else return head_mix_stream_bwd_h12_launch_bf16(b, workspace, stream);
}

// 12 heads of 48-64: the head-split kernels' unit (head_mix_split_bwd_<dtype>_cuda.cu)
template <typename T>
int64_t mix_split_workspace(const WindowAttentionBackwardParams& b) {
  if constexpr (std::is_same_v<T, __half>) return head_mix_split_bwd_workspace_f16(b);
  else return head_mix_split_bwd_workspace_bf16(b);
}
template <typename T>
int mix_split_launch(const WindowAttentionBackwardParams& b, void* workspace, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, __half>) return head_mix_split_bwd_launch_f16(b, workspace, stream);
  else return head_mix_split_bwd_launch_bf16(b, workspace, stream);
}
inline bool mix_split_route(const WindowAttentionParams& p) {
  return mix_split_bwd_shape(p.heads, mix_stream_dim(p.dim_k, p.dim_v));
}

template <typename T>
bool mix_stream_try_backward_workspace(const WindowAttentionBackwardParams& b, int64_t* elements) {
  if constexpr (sizeof(T) == 2) {
    if (!mix_stream_bwd_route_ok(b.fwd)) return false;
    if (mix_split_route(b.fwd)) {
      *elements = mix_split_workspace<T>(b);
      return true;
    }
    *elements = with_mix_stream_bwd_shape(b.fwd, [&](auto h, auto d) {
      if constexpr (decltype(h)::value == 12) return mix_stream_h12_workspace<T>(b);
      else return mix_stream_bwd_workspace<T, decltype(h)::value, decltype(d)::value>(b);
    });
    return true;
  }
  return false;
}

template <typename T>
bool mix_stream_try_backward(const WindowAttentionBackwardParams& b, void* workspace, cudaStream_t stream, int* err) {
  if constexpr (sizeof(T) == 2) {
    if (!mix_stream_bwd_route_ok(b.fwd)) return false;
    if (mix_split_route(b.fwd)) {
      *err = mix_split_launch<T>(b, workspace, stream);
      return true;
    }
    *err = with_mix_stream_bwd_shape(b.fwd, [&](auto h, auto d) {
      if constexpr (decltype(h)::value == 12) return mix_stream_h12_launch<T>(b, workspace, stream);
      else return mix_stream_backward<T, decltype(h)::value, decltype(d)::value>(b, static_cast<float*>(workspace), stream);
    });
    return true;
  }
  return false;
}

template <typename T>
int mix_stream_try_backward_kv(const WindowAttentionBackwardParams& b, const float* bias, const float* dd,
                               cudaStream_t stream) {
  return with_mix_stream_bwd_shape(b.fwd, [&](auto h, auto d) {
    return mix_stream_backward_kv<T, decltype(h)::value, decltype(d)::value>(b, bias, dd, stream);
  });
}

}  // namespace
}  // namespace vitfast
