// Head-mixing attention backward (see head_mix_common.cuh). Included by window_attention_cuda.cu
// only. With A_h = scale q_h k_h^T + bias_h, S'_g = sum_h pre[g, h] A_h + mask,
// P = softmax(S'), P'_g = sum_h post[g, h] P_h + post_bias[g], out_g = P'_g v_g:
//   dP'_g = dO_g v_g^T            dV_g = P'_g^T dO_g
//   dP_h  = sum_g post[g, h] dP'_g,   D_h = rowsum(P_h dP_h),   dS'_h = P_h (dP_h - D_h)
//   dA_h  = sum_g pre[g, h] dS'_g     dQ_h = scale dA_h k_h,  dK_h = scale dA_h^T q_h,  dbias_h = dA_h
//   d post[g, h] = <dP'_g, P_h>, d post_bias[g] = <dP'_g, 1>, d pre[g, h] = <dS'_g, A_h>
//
// Kernel 1, query-major (block = window slot x QC*16 query rows, all heads): pass 1 over the keys
// computes D; pass 2 forms dS' and dA per key tile, adds dA K into dQ (shared memory, or a
// per-block global slice when too large), dA into the slot's bias-gradient partial, and the
// small-parameter products as tensor-core GEMMs over the tile's entries: [dP'; dS'] rows times
// [P, 1; A] rows (the row of ones gives d post_bias), accumulated per block in a fixed order.
// Kernel 2, key-major (block = window slot x KC*16 keys, all heads): streams 16-row query tiles,
// recomputes P' and dA from the saved lse and D, and sums dV = P'^T dO and dK = dA^T Q for its
// keys. Slot and block partials are summed in a fixed order: every gradient is bitwise
// reproducible.
#pragma once

#include "head_mix_common.cuh"

namespace vitfast {
namespace {

// ---------------------------------------------------------------------------------------------
// Kernel 1: D, dQ, bias and mixing-parameter gradients

struct MixBwdQLayout {
  int QC, KT, chunks;
  int64_t slots;
  int ldq, ldv, ldkv, lds, ldk_acc;
  int pe;   // head pitch of the element buffers: QC*16*KT + 16
  int hp;   // rows of the parameter GEMMs: round16(heads + 1)
  int ldg;  // hp + 4
  bool mix_grad, dq_smem;
  int64_t dq_elems;  // per block, when dQ lives in global scratch
};

template <typename T, typename Acc>
struct MixBwdQSmem {
  T *q, *dout, *kv;
  Acc *s, *dp, *lse, *dd, *dq;
  T *y1, *x1, *y2, *x2, *da;  // P (+ ones row), dP', A, dS' (parameter GEMMs); dA
  Acc *gpost, *gpre;
  MixWeights<Acc> w;
};

template <typename T, typename Acc>
__host__ __device__ MixBwdQSmem<T, Acc> carve_mix_bwd_q(SmemCarver& sc, const MixBwdQLayout& L, int H) {
  MixBwdQSmem<T, Acc> s{};
  const size_t qr = static_cast<size_t>(L.QC) * 16;
  s.q = sc.take<T>(H * qr * L.ldq);
  s.dout = sc.take<T>(H * qr * L.ldv);
  s.kv = sc.take<T>(static_cast<size_t>(H) * L.KT * L.ldkv);
  s.s = sc.take<Acc>(H * qr * L.lds);
  s.dp = sc.take<Acc>(H * qr * L.lds);
  s.lse = sc.take<Acc>(H * qr);
  s.dd = sc.take<Acc>(H * qr);
  s.w = carve_weights<Acc>(sc, H);
  s.dq = L.dq_smem ? sc.take<Acc>(H * qr * L.ldk_acc) : nullptr;
  if (L.mix_grad) {
    s.gpost = sc.take<Acc>(static_cast<size_t>(L.hp) * L.ldg);
    s.gpre = sc.take<Acc>(static_cast<size_t>(L.hp) * L.ldg);
    // The GEMMs read hp rows from each operand; rows past a buffer's own fall into the buffers
    // after it (or the padding below) and only reach outputs that are discarded.
    s.y1 = sc.take<T>(static_cast<size_t>(H + 1) * L.pe);
    s.x1 = sc.take<T>(static_cast<size_t>(H) * L.pe);
    s.y2 = sc.take<T>(static_cast<size_t>(H) * L.pe);
    const size_t x2_start = (sc.offset + 127) & ~static_cast<size_t>(127);
    s.x2 = sc.take<T>(static_cast<size_t>(H) * L.pe);
    s.da = sc.take<T>(static_cast<size_t>(H) * L.pe);
    const size_t need = x2_start + static_cast<size_t>(L.hp) * L.pe * sizeof(T);
    if (need > sc.offset) sc.take<unsigned char>(need - sc.offset);
  } else {
    s.da = sc.take<T>(static_cast<size_t>(H) * L.pe);
  }
  return s;
}

// s = Q K^T and dp = dO V^T for one key tile; leaves K in the staging buffer (for dQ).
template <typename T, typename Acc, bool kVec>
__device__ __forceinline__ void mix_bwd_q_tile(const WindowAttentionParams& p, const MixBwdQLayout& L,
                                               const MixBwdQSmem<T, Acc>& sm, int64_t w, int key0) {
  const int H = p.heads, qr = L.QC * 16;
  const int q_pitch = qr * L.ldq, v_pitch = qr * L.ldv, kv_pitch = L.KT * L.ldkv, s_pitch = qr * L.lds;
  __syncthreads();  // previous users of kv / s / dp done
  load_qkv_tile<T, kVec>(p, w, 0, H, p.v_off, p.dim_v, key0, L.KT, sm.kv, L.ldkv, kv_pitch);
  __syncthreads();
  mix_scores_mma<T, Acc>(sm.dout, L.ldv, v_pitch, sm.kv, L.ldkv, kv_pitch, sm.dp, L.lds, s_pitch, H, L.QC, L.KT / 16,
                         round16(p.dim_v));
  __syncthreads();
  load_qkv_tile<T, kVec>(p, w, 0, H, p.k_off, p.dim_k, key0, L.KT, sm.kv, L.ldkv, kv_pitch);
  __syncthreads();
  mix_scores_mma<T, Acc>(sm.q, L.ldq, q_pitch, sm.kv, L.ldkv, kv_pitch, sm.s, L.lds, s_pitch, H, L.QC, L.KT / 16,
                         round16(p.dim_k));
}

template <typename T, typename Acc, bool kVec, int kCap>
__global__ void __launch_bounds__(kMixThreads)
    head_mix_bwd_q_kernel(const WindowAttentionBackwardParams b, const MixBwdQLayout L, Acc* dd_out, Acc* dbias_slots,
                          Acc* mix_partials, Acc* dq_scratch) {
  VF_DYNAMIC_SMEM(smem_raw);
  SmemCarver sc{smem_raw};
  const WindowAttentionParams& p = b.fwd;
  const int H = p.heads, N = p.tokens;
  const MixBwdQSmem<T, Acc> sm = carve_mix_bwd_q<T, Acc>(sc, L, H);
  const int chunk = static_cast<int>(blockIdx.x % L.chunks);
  const int64_t slot = blockIdx.x / L.chunks;
  const int qr = L.QC * 16, row0 = chunk * qr, KT = L.KT;
  const int q_pitch = qr * L.ldq, v_pitch = qr * L.ldv, kv_pitch = KT * L.ldkv, s_pitch = qr * L.lds;
  const int dq_pitch = qr * L.ldk_acc;
  const int dkp = round16(p.dim_k);
  Acc* dq = accumulator<Acc>(sm.dq, dq_scratch, L.dq_elems);
  Acc* dbias = dbias_slots != nullptr ? dbias_slots + slot * H * N * N : nullptr;
  const ElemMap em(qr);
  const int i = row0 + em.row;
  const int ntiles = (N + KT - 1) / KT;
  const int warp = threadIdx.x >> 5;
  load_weights<Acc>(p, sm.w);
  if (L.mix_grad) {
    for (int e = threadIdx.x; e < L.hp * L.ldg; e += blockDim.x) sm.gpost[e] = sm.gpre[e] = Acc(0);
  }

  for (int64_t w = slot; w < p.windows; w += L.slots) {
    __syncthreads();  // previous window's dQ written out
    load_qkv_tile<T, kVec>(p, w, 0, H, p.q_off, p.dim_k, row0, qr, sm.q, L.ldq, q_pitch);
    load_tile<T, kVec>(p, b.grad_out, p.out_strides, w, 0, H, 0, p.dim_v, p.dim_v, row0, qr, sm.dout, L.ldv, v_pitch);
    for (int e = threadIdx.x; e < H * qr; e += blockDim.x) {
      const int h = e / qr, r = e - h * qr;
      sm.lse[e] = row0 + r < N ? static_cast<const Acc*>(p.lse)[(w * H + h) * N + row0 + r] : Acc(0);
      sm.dd[e] = Acc(0);
    }
    for (int e = threadIdx.x; e < H * dq_pitch; e += blockDim.x) dq[e] = Acc(0);

    // pass 1: D_h = rowsum(P_h dP_h)
    for (int t = 0; t < ntiles; ++t) {
      const int key0 = t * KT;
      mix_bwd_q_tile<T, Acc, kVec>(p, L, sm, w, key0);
      __syncthreads();
      const int cols = i < N ? min(KT, N - key0) : 0;
      Acc* srow = sm.s + em.row * L.lds;
      Acc* dprow = sm.dp + em.row * L.lds;
      for (int c = em.col; c < cols; c += em.tpr) {
        Acc a[kCap], dpm[kCap];
        mix_scores<Acc, kCap>(p, sm.w, w, i, key0 + c, srow + c, s_pitch, a);
        to_probabilities<Acc>(H, srow + c, s_pitch, sm.lse + em.row, qr);
        to_prob_grads<Acc, kCap>(H, sm.w, dprow + c, s_pitch, dpm);
      }
      for (int h = 0; h < H; ++h) {
        Acc d = 0;
        for (int c = em.col; c < cols; c += em.tpr) d += srow[h * s_pitch + c] * dprow[h * s_pitch + c];
        d = row_sum(d, em.tpr);
        if (em.col == 0 && i < N) sm.dd[h * qr + em.row] += d;
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < H * qr; e += blockDim.x) {
      const int h = e / qr, r = e - h * qr;
      if (row0 + r < N) dd_out[(w * H + h) * N + row0 + r] = sm.dd[e];
    }

    // pass 2: dS', dA, dQ, bias and parameter gradients
    for (int t = 0; t < ntiles; ++t) {
      const int key0 = t * KT;
      mix_bwd_q_tile<T, Acc, kVec>(p, L, sm, w, key0);
      __syncthreads();
      const int cols = i < N ? min(KT, N - key0) : 0;
      Acc* srow = sm.s + em.row * L.lds;
      Acc* dprow = sm.dp + em.row * L.lds;
      for (int c = em.col; c < KT; c += em.tpr) {
        const int e = em.row * KT + c;
        if (c < cols) {
          const int j = key0 + c;
          Acc a[kCap], dpm[kCap], ds[kCap];
          mix_scores<Acc, kCap>(p, sm.w, w, i, j, srow + c, s_pitch, a);
          to_probabilities<Acc>(H, srow + c, s_pitch, sm.lse + em.row, qr);
          to_score_grads<Acc, kCap>(H, sm.w, srow + c, dprow + c, s_pitch, sm.dd + em.row, qr, dpm);
          if (L.mix_grad) {  // operands of the parameter GEMMs: [dP'; dS'] and [P, 1; A]
#pragma unroll
            for (int h = 0; h < kCap; ++h) {
              if (h < H) {
                sm.y2[h * L.pe + e] = wa::from_acc<T>(a[h]);
                sm.x1[h * L.pe + e] = wa::from_acc<T>(dpm[h]);
              }
            }
            for (int h = 0; h < H; ++h) {
              sm.y1[h * L.pe + e] = wa::from_acc<T>(srow[h * s_pitch + c]);
              sm.x2[h * L.pe + e] = wa::from_acc<T>(dprow[h * s_pitch + c]);
            }
            sm.y1[H * L.pe + e] = wa::from_acc<T>(Acc(1));
          }
          load_heads<Acc, kCap>(H, dprow + c, s_pitch, ds);
          for (int h = 0; h < H; ++h) {  // dA_h = sum_g pre[g, h] dS'_g
            const Acc da = dot_heads<Acc, kCap>(H, sm.w.pre + h, H, ds);
            sm.da[h * L.pe + e] = wa::from_acc<T>(da);
            if (dbias != nullptr) dbias[(static_cast<int64_t>(h) * N + i) * N + j] += da;
          }
        } else {
          const T zero = wa::from_acc<T>(Acc(0));
          for (int h = 0; h < H; ++h) {
            sm.da[h * L.pe + e] = zero;
            if (L.mix_grad) sm.y1[h * L.pe + e] = sm.x1[h * L.pe + e] = sm.y2[h * L.pe + e] = sm.x2[h * L.pe + e] = zero;
          }
          if (L.mix_grad) sm.y1[H * L.pe + e] = zero;
        }
      }
      __syncthreads();
      const int ntile_k = dkp / 16, dq_items = H * L.QC * ntile_k;
      const int gtiles = L.mix_grad ? (L.hp / 16) * (L.hp / 16) : 0;
      const int E = qr * KT;
      for (int item = warp; item < dq_items + 2 * gtiles; item += kMixWarps) {
        if (item < dq_items) {  // dQ_h += dA_h K_h (scaled at the end)
          const int h = item / (L.QC * ntile_k), rem = item - h * L.QC * ntile_k;
          const int qt = rem / ntile_k, nt = rem - qt * ntile_k;
          wa::warp_mma<true, true>(sm.da + h * L.pe + qt * 16 * KT, KT, sm.kv + h * kv_pitch + nt * 16, L.ldkv,
                                   dq + h * dq_pitch + qt * 16 * L.ldk_acc + nt * 16, L.ldk_acc, KT, true);
        } else {  // d post (+ post_bias via the ones row) and d pre, over this tile's entries
          const int gi = item - dq_items, which = gi / gtiles, tile = gi - which * gtiles;
          const int gt = tile / (L.hp / 16), ht = tile - gt * (L.hp / 16);
          const T* x = which == 0 ? sm.x1 : sm.x2;
          const T* y = which == 0 ? sm.y1 : sm.y2;
          Acc* g = which == 0 ? sm.gpost : sm.gpre;
          wa::warp_mma<true, false>(x + gt * 16 * L.pe, L.pe, y + ht * 16 * L.pe, L.pe, g + gt * 16 * L.ldg + ht * 16,
                                    L.ldg, E, true);
        }
      }
    }
    __syncthreads();
    const Strides3& gs = b.grad_qkv_strides;
    const Acc scale = static_cast<Acc>(p.scale);
    for (int e = threadIdx.x; e < H * qr * p.dim_k; e += blockDim.x) {
      const int h = e / (qr * p.dim_k), rem = e - h * qr * p.dim_k;
      const int r = rem / p.dim_k, c = rem - r * p.dim_k;
      if (row0 + r >= N) continue;
      static_cast<T*>(b.grad_qkv)[token_offset(p.grid, gs.img, gs.y, gs.x, w, row0 + r) + p.q_off + h * p.head_stride +
                                  c] = wa::from_acc<T>(scale * dq[h * dq_pitch + r * L.ldk_acc + c]);
    }
  }
  if (L.mix_grad) {  // this block's share: [pre (H x H) | post (H x H) | post_bias (H)]
    __syncthreads();
    Acc* out = mix_partials + static_cast<int64_t>(blockIdx.x) * (2 * H * H + H);
    for (int e = threadIdx.x; e < H * H; e += blockDim.x) {
      const int g = e / H, h = e - g * H;
      out[e] = sm.gpre[g * L.ldg + h];
      out[H * H + e] = sm.gpost[g * L.ldg + h];
    }
    for (int g = threadIdx.x; g < H; g += blockDim.x) out[2 * H * H + g] = sm.gpost[g * L.ldg + H];
  }
}

template <typename T, typename Acc>
size_t mix_bwd_q_smem(const MixBwdQLayout& L, int H) {
  SmemCarver sc{nullptr};
  carve_mix_bwd_q<T, Acc>(sc, L, H);
  return sc.offset;
}

template <typename T, typename Acc>
MixBwdQLayout plan_mix_bwd_q(const WindowAttentionBackwardParams& b, size_t smem_limit, size_t* smem) {
  const WindowAttentionParams& p = b.fwd;
  const int H = p.heads, dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  const int qtiles = (p.tokens + 15) / 16;
  const bool mix_grad = b.grad_pre_mix != nullptr;
  MixBwdQLayout best{};
  for (int pass = force_scratch() ? 2 : 0; pass < 3 && best.QC == 0; ++pass) {
    const size_t budget = pass == 0 ? std::min(kMixSmemTarget, smem_limit) : smem_limit;
    int best_work = 0;
    for (int QC : {4, 2, 1}) {
      if (QC > qtiles && QC > 1) continue;
      for (int KT : {64, 32, 16}) {
        if (KT > mix_max_keys(QC * 16) || (KT > round16(p.tokens) && KT > 16)) continue;
        MixBwdQLayout L{QC, KT, (qtiles + QC - 1) / QC, 1, wa::ld_in(dkp), wa::ld_in(dvp),
                        wa::ld_in(std::max(dkp, dvp)), wa::ld_acc(KT), wa::ld_acc(dkp), QC * 16 * KT + 16,
                        round16(H + 1), round16(H + 1) + 4, mix_grad, pass < 2, 0};
        L.dq_elems = round64(static_cast<int64_t>(H) * QC * 16 * L.ldk_acc);
        const size_t bytes = mix_bwd_q_smem<T, Acc>(L, H);
        if (bytes <= budget && QC * KT > best_work) {
          best = L;
          best_work = QC * KT;
          *smem = bytes;
        }
      }
    }
  }
  if (best.QC != 0) {
    // per-slot bias partials capped at ~256 MB; slots bounded whenever anything is per block
    const int64_t per_slot = static_cast<int64_t>(H) * p.tokens * p.tokens * sizeof(Acc);
    const int64_t cap = b.dbias != nullptr ? std::max<int64_t>(1, (int64_t{256} << 20) / per_slot) : p.windows;
    best.slots = mix_slots(p.windows, best.chunks, !best.dq_smem || mix_grad || b.dbias != nullptr, cap);
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Kernel 2: dK, dV

struct MixBwdKLayout {
  int KC, chunks;
  int64_t slots;
  int ldq, ldv, lds, ldk_acc, ldv_acc;
  int pe;  // 16 * KC*16 + 16
  bool acc_smem;
  int64_t acc_elems;  // per block: dK then dV, when in global scratch
};

template <typename T, typename Acc>
struct MixBwdKSmem {
  T *k, *v, *q, *dout, *pp, *da;
  Acc *s, *dp, *lse, *dd, *dk, *dv;
  MixWeights<Acc> w;
};

template <typename T, typename Acc>
__host__ __device__ MixBwdKSmem<T, Acc> carve_mix_bwd_k(SmemCarver& sc, const MixBwdKLayout& L, int H) {
  MixBwdKSmem<T, Acc> s{};
  const size_t kr = static_cast<size_t>(L.KC) * 16;
  s.k = sc.take<T>(H * kr * L.ldq);
  s.v = sc.take<T>(H * kr * L.ldv);
  s.q = sc.take<T>(static_cast<size_t>(H) * 16 * L.ldq);
  s.dout = sc.take<T>(static_cast<size_t>(H) * 16 * L.ldv);
  s.s = sc.take<Acc>(static_cast<size_t>(H) * 16 * L.lds);
  s.dp = sc.take<Acc>(static_cast<size_t>(H) * 16 * L.lds);
  s.pp = sc.take<T>(static_cast<size_t>(H) * L.pe);
  s.da = sc.take<T>(static_cast<size_t>(H) * L.pe);
  s.lse = sc.take<Acc>(static_cast<size_t>(H) * 16);
  s.dd = sc.take<Acc>(static_cast<size_t>(H) * 16);
  s.w = carve_weights<Acc>(sc, H);
  if (L.acc_smem) {
    s.dk = sc.take<Acc>(H * kr * L.ldk_acc);
    s.dv = sc.take<Acc>(H * kr * L.ldv_acc);
  }
  return s;
}

template <typename T, typename Acc, bool kVec, int kCap>
__global__ void __launch_bounds__(kMixThreads)
    head_mix_bwd_kv_kernel(const WindowAttentionBackwardParams b, const MixBwdKLayout L, const Acc* dd_in,
                           Acc* acc_scratch) {
  VF_DYNAMIC_SMEM(smem_raw);
  SmemCarver sc{smem_raw};
  const WindowAttentionParams& p = b.fwd;
  const int H = p.heads, N = p.tokens;
  const MixBwdKSmem<T, Acc> sm = carve_mix_bwd_k<T, Acc>(sc, L, H);
  const int chunk = static_cast<int>(blockIdx.x % L.chunks);
  const int64_t slot = blockIdx.x / L.chunks;
  const int kr = L.KC * 16, key_base = chunk * kr;
  const int k_pitch = kr * L.ldq, v_pitch = kr * L.ldv, q_pitch = 16 * L.ldq, o_pitch = 16 * L.ldv;
  const int s_pitch = 16 * L.lds, dk_pitch = kr * L.ldk_acc, dv_pitch = kr * L.ldv_acc;
  const int dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  Acc* dk = sm.dk;
  Acc* dv = sm.dv;
  if (!L.acc_smem) {
    dk = acc_scratch + static_cast<int64_t>(blockIdx.x) * L.acc_elems;
    dv = dk + H * dk_pitch;
  }
  const ElemMap em(16);
  const int warp = threadIdx.x >> 5;
  load_weights<Acc>(p, sm.w);

  for (int64_t w = slot; w < p.windows; w += L.slots) {
    __syncthreads();  // previous window's dK / dV written out
    load_qkv_tile<T, kVec>(p, w, 0, H, p.k_off, p.dim_k, key_base, kr, sm.k, L.ldq, k_pitch);
    load_qkv_tile<T, kVec>(p, w, 0, H, p.v_off, p.dim_v, key_base, kr, sm.v, L.ldv, v_pitch);
    for (int e = threadIdx.x; e < H * dk_pitch; e += blockDim.x) dk[e] = Acc(0);
    for (int e = threadIdx.x; e < H * dv_pitch; e += blockDim.x) dv[e] = Acc(0);

    for (int q0 = 0; q0 < N; q0 += 16) {
      __syncthreads();  // previous query tile's products done
      load_qkv_tile<T, kVec>(p, w, 0, H, p.q_off, p.dim_k, q0, 16, sm.q, L.ldq, q_pitch);
      load_tile<T, kVec>(p, b.grad_out, p.out_strides, w, 0, H, 0, p.dim_v, p.dim_v, q0, 16, sm.dout, L.ldv, o_pitch);
      for (int e = threadIdx.x; e < H * 16; e += blockDim.x) {
        const int h = e / 16, r = e - h * 16;
        const int64_t row = (w * H + h) * N + q0 + r;
        sm.lse[e] = q0 + r < N ? static_cast<const Acc*>(p.lse)[row] : Acc(0);
        sm.dd[e] = q0 + r < N ? dd_in[row] : Acc(0);
      }
      __syncthreads();
      mix_scores_mma<T, Acc>(sm.q, L.ldq, q_pitch, sm.k, L.ldq, k_pitch, sm.s, L.lds, s_pitch, H, 1, L.KC, dkp);
      mix_scores_mma<T, Acc>(sm.dout, L.ldv, o_pitch, sm.v, L.ldv, v_pitch, sm.dp, L.lds, s_pitch, H, 1, L.KC, dvp);
      __syncthreads();
      const int i = q0 + em.row;
      const int cols = i < N ? min(kr, N - key_base) : 0;
      Acc* srow = sm.s + em.row * L.lds;
      Acc* dprow = sm.dp + em.row * L.lds;
      for (int c = em.col; c < kr; c += em.tpr) {
        const int e = em.row * kr + c;
        if (c < cols) {
          Acc a[kCap], dpm[kCap], ds[kCap];
          mix_scores<Acc, kCap>(p, sm.w, w, i, key_base + c, srow + c, s_pitch, a);
          to_probabilities<Acc>(H, srow + c, s_pitch, sm.lse + em.row, 16);
          post_mix_to<T, Acc, kCap>(H, sm.w, srow + c, s_pitch, sm.pp + e, L.pe);
          to_score_grads<Acc, kCap>(H, sm.w, srow + c, dprow + c, s_pitch, sm.dd + em.row, 16, dpm);
          load_heads<Acc, kCap>(H, dprow + c, s_pitch, ds);
          for (int h = 0; h < H; ++h) sm.da[h * L.pe + e] = wa::from_acc<T>(dot_heads<Acc, kCap>(H, sm.w.pre + h, H, ds));
        } else {
          for (int h = 0; h < H; ++h) sm.pp[h * L.pe + e] = sm.da[h * L.pe + e] = wa::from_acc<T>(Acc(0));
        }
      }
      __syncthreads();
      const int tk = dkp / 16, tv = dvp / 16;
      const int k_items = H * L.KC * tk, items = k_items + H * L.KC * tv;
      for (int item = warp; item < items; item += kMixWarps) {
        if (item < k_items) {  // dK_h += dA_h^T Q_h (scaled at the end)
          const int h = item / (L.KC * tk), rem = item - h * L.KC * tk;
          const int kt = rem / tk, nt = rem - kt * tk;
          wa::warp_mma<false, true>(sm.da + h * L.pe + kt * 16, kr, sm.q + h * q_pitch + nt * 16, L.ldq,
                                    dk + h * dk_pitch + kt * 16 * L.ldk_acc + nt * 16, L.ldk_acc, 16, true);
        } else {  // dV_g += P'_g^T dO_g
          const int it = item - k_items;
          const int g = it / (L.KC * tv), rem = it - g * L.KC * tv;
          const int kt = rem / tv, nt = rem - kt * tv;
          wa::warp_mma<false, true>(sm.pp + g * L.pe + kt * 16, kr, sm.dout + g * o_pitch + nt * 16, L.ldv,
                                    dv + g * dv_pitch + kt * 16 * L.ldv_acc + nt * 16, L.ldv_acc, 16, true);
        }
      }
    }
    __syncthreads();
    const Strides3& gs = b.grad_qkv_strides;
    const Acc scale = static_cast<Acc>(p.scale);
    T* grad = static_cast<T*>(b.grad_qkv);
    for (int e = threadIdx.x; e < H * kr * p.dim_k; e += blockDim.x) {
      const int h = e / (kr * p.dim_k), rem = e - h * kr * p.dim_k;
      const int r = rem / p.dim_k, c = rem - r * p.dim_k;
      if (key_base + r >= N) continue;
      grad[token_offset(p.grid, gs.img, gs.y, gs.x, w, key_base + r) + p.k_off + h * p.head_stride + c] =
          wa::from_acc<T>(scale * dk[h * dk_pitch + r * L.ldk_acc + c]);
    }
    for (int e = threadIdx.x; e < H * kr * p.dim_v; e += blockDim.x) {
      const int h = e / (kr * p.dim_v), rem = e - h * kr * p.dim_v;
      const int r = rem / p.dim_v, c = rem - r * p.dim_v;
      if (key_base + r >= N) continue;
      grad[token_offset(p.grid, gs.img, gs.y, gs.x, w, key_base + r) + p.v_off + h * p.head_stride + c] =
          wa::from_acc<T>(dv[h * dv_pitch + r * L.ldv_acc + c]);
    }
  }
}

template <typename T, typename Acc>
size_t mix_bwd_k_smem(const MixBwdKLayout& L, int H) {
  SmemCarver sc{nullptr};
  carve_mix_bwd_k<T, Acc>(sc, L, H);
  return sc.offset;
}

template <typename T, typename Acc>
MixBwdKLayout plan_mix_bwd_k(const WindowAttentionBackwardParams& b, size_t smem_limit, size_t* smem) {
  const WindowAttentionParams& p = b.fwd;
  const int H = p.heads, dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  const int ktiles = (p.tokens + 15) / 16;
  MixBwdKLayout best{};
  for (int pass = force_scratch() ? 2 : 0; pass < 3 && best.KC == 0; ++pass) {
    const size_t budget = pass == 0 ? std::min(kMixSmemTarget, smem_limit) : smem_limit;
    for (int KC : {4, 2, 1}) {
      if (KC > ktiles && KC > 1) continue;
      MixBwdKLayout L{KC, (ktiles + KC - 1) / KC, 1, wa::ld_in(dkp), wa::ld_in(dvp), wa::ld_acc(KC * 16),
                      wa::ld_acc(dkp), wa::ld_acc(dvp), 16 * KC * 16 + 16, pass < 2, 0};
      L.acc_elems = round64(static_cast<int64_t>(H) * KC * 16 * (L.ldk_acc + L.ldv_acc));
      const size_t bytes = mix_bwd_k_smem<T, Acc>(L, H);
      if (bytes <= budget) {
        best = L;
        *smem = bytes;
        break;
      }
    }
  }
  if (best.KC != 0) best.slots = mix_slots(p.windows, best.chunks, !best.acc_smem, p.windows);
  return best;
}

// ---------------------------------------------------------------------------------------------
// Workspace (in Acc elements): D | bias slots | parameter partials | dQ scratch | dK/dV scratch

struct MixBwdPlan {
  MixBwdQLayout q;
  MixBwdKLayout k;
  size_t smem_q = 0, smem_k = 0;
  int64_t dd = 0, slots = 0, mix = 0, dq = 0, kv = 0;
  bool ok() const { return q.QC != 0 && k.KC != 0; }
  int64_t total() const { return dd + slots + mix + dq + kv; }
};

template <typename T>
MixBwdPlan plan_mix_bwd(const WindowAttentionBackwardParams& b) {
  using Acc = typename wa::AccOf<T>::type;
  const WindowAttentionParams& p = b.fwd;
  MixBwdPlan plan;
  const size_t limit = device_smem_optin();
  plan.q = plan_mix_bwd_q<T, Acc>(b, limit, &plan.smem_q);
  plan.k = plan_mix_bwd_k<T, Acc>(b, limit, &plan.smem_k);
  if (!plan.ok()) return plan;
  const int64_t H = p.heads, N = p.tokens;
  const int64_t blocks_q = plan.q.slots * plan.q.chunks, blocks_k = plan.k.slots * plan.k.chunks;
  // regions rounded to 64 elements: the scratch accumulators are WMMA operands (32-byte alignment)
  plan.dd = round64(p.windows * H * N);
  plan.slots = b.dbias != nullptr ? round64(plan.q.slots * H * N * N) : 0;
  plan.mix = plan.q.mix_grad ? round64(blocks_q * (2 * H * H + H)) : 0;
  plan.dq = plan.q.dq_smem ? 0 : blocks_q * plan.q.dq_elems;
  plan.kv = plan.k.acc_smem ? 0 : blocks_k * plan.k.acc_elems;
  return plan;
}

template <typename T>
int64_t head_mix_backward_workspace_typed(const WindowAttentionBackwardParams& b) {
  const MixBwdPlan plan = plan_mix_bwd<T>(b);
  return plan.ok() ? plan.total() : -1;
}

template <typename T, int kCap>
int head_mix_backward_typed(const WindowAttentionBackwardParams& b, void* workspace, cudaStream_t stream) {
  using Acc = typename wa::AccOf<T>::type;
  const WindowAttentionParams& p = b.fwd;
  const MixBwdPlan plan = plan_mix_bwd<T>(b);
  if (!plan.ok()) return static_cast<int>(cudaErrorInvalidConfiguration);
  Acc* dd = static_cast<Acc*>(workspace);
  Acc* slots = plan.slots ? dd + plan.dd : nullptr;
  Acc* mix = plan.mix ? dd + plan.dd + plan.slots : nullptr;
  Acc* dq = plan.dq ? dd + plan.dd + plan.slots + plan.mix : nullptr;
  Acc* kv = plan.kv ? dd + plan.dd + plan.slots + plan.mix + plan.dq : nullptr;
  if (p.bias_buffer != nullptr) {
    auto fill = head_mix_table_kernel<Acc>;
    VF_LAUNCH(fill, blocks_for(static_cast<int64_t>(p.heads) * p.tokens * p.tokens, 256), 256, 0, stream, p);
  }
  if (slots != nullptr) {
    cudaError_t err = cudaMemsetAsync(slots, 0, plan.slots * sizeof(Acc), stream);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  auto kq = head_mix_bwd_q_kernel<T, Acc, false, kCap>;
  auto kk = head_mix_bwd_kv_kernel<T, Acc, false, kCap>;
  if constexpr (sizeof(T) == 2) {
    if (vec_ok<T>(p, b.grad_out)) {
      kq = head_mix_bwd_q_kernel<T, Acc, true, kCap>;
      kk = head_mix_bwd_kv_kernel<T, Acc, true, kCap>;
    }
  }
  cudaError_t err = cudaFuncSetAttribute(kq, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_q));
  if (err != cudaSuccess) return static_cast<int>(err);
  err = cudaFuncSetAttribute(kk, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_k));
  if (err != cudaSuccess) return static_cast<int>(err);
  VF_LAUNCH(kq, static_cast<unsigned>(plan.q.slots * plan.q.chunks), kMixThreads, plan.smem_q, stream, b, plan.q, dd,
            slots, mix, dq);
  VF_LAUNCH(kk, static_cast<unsigned>(plan.k.slots * plan.k.chunks), kMixThreads, plan.smem_k, stream, b, plan.k,
            static_cast<const Acc*>(dd), kv);
  constexpr int kThreads = 256;
  if (slots != nullptr) {
    const int64_t per_slot = static_cast<int64_t>(p.heads) * p.tokens * p.tokens;
    auto reduce = window_attention_slot_reduce_kernel<Acc>;
    VF_LAUNCH(reduce, blocks_for(per_slot, kThreads), kThreads, 0, stream, slots, plan.q.slots, per_slot,
              static_cast<Acc*>(b.dbias));
  }
  if (mix != nullptr) {  // grad_pre_mix, grad_post_mix, grad_post_mix_bias: one contiguous buffer
    const int64_t per_block = 2LL * p.heads * p.heads + p.heads;
    auto reduce = window_attention_slot_reduce_kernel<Acc>;
    VF_LAUNCH(reduce, blocks_for(per_block, kThreads), kThreads, 0, stream, mix, plan.q.slots * plan.q.chunks,
              per_block, static_cast<Acc*>(b.grad_pre_mix));
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace vitfast
