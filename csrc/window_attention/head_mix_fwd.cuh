// Head-mixing attention forward (see head_mix_common.cuh for why it takes two passes).
// Included by window_attention_cuda.cu only.
//
// Block = (window slot, query chunk of QC x 16 rows), all heads; 8 warps. Per key tile of KT keys:
//   pass 0: S_h = Q_h K_h^T on tensor cores (all heads) -> per-row online statistics of the mixed
//           scores S'_g (max, sum of exp), reduced over the row's lanes with shuffles;
//   pass 1: S_h again (skipped when one tile holds every key: the scores are still there),
//           P_g = exp(S'_g - lse_g), P'_g = sum_h post[g, h] P_h + post_bias[g] written to shared
//           memory in the input dtype, O_g += P'_g V_g on tensor cores.
// K and V share one staging buffer (V is loaded after the scores are taken). O is final when
// pass 1 ends (P' is already normalised); it lives in shared memory, or in a per-block slice of a
// global scratch buffer when shared memory cannot hold it (large heads x head dims).
#pragma once

#include "head_mix_common.cuh"

namespace vitfast {
namespace {

struct MixFwdLayout {
  int QC, KT, chunks;
  int64_t slots;
  int ldq, ldkv, lds, ldp, ldo;
  bool o_smem;
  int64_t o_elems;  // per block: heads x rows x ldo, rounded to 64
};

template <typename T, typename Acc>
struct MixFwdSmem {
  T *q, *kv, *pm;
  Acc *s, *m, *l, *o;
  MixWeights<Acc> w;
};

template <typename T, typename Acc>
__host__ __device__ MixFwdSmem<T, Acc> carve_mix_fwd(SmemCarver& sc, const MixFwdLayout& L, int H) {
  MixFwdSmem<T, Acc> s;
  const size_t qr = static_cast<size_t>(L.QC) * 16;
  s.q = sc.take<T>(H * qr * L.ldq);
  s.kv = sc.take<T>(static_cast<size_t>(H) * L.KT * L.ldkv);
  s.s = sc.take<Acc>(H * qr * L.lds);
  s.pm = sc.take<T>(H * qr * L.ldp);
  s.m = sc.take<Acc>(H * qr);
  s.l = sc.take<Acc>(H * qr);
  s.w = carve_weights<Acc>(sc, H);
  s.o = L.o_smem ? sc.take<Acc>(H * qr * L.ldo) : nullptr;
  return s;
}

template <typename T, typename Acc, bool kVec, int kCap>
__global__ void __launch_bounds__(kMixThreads)
    head_mix_fwd_kernel(const WindowAttentionParams p, const MixFwdLayout L, Acc* scratch) {
  VF_DYNAMIC_SMEM(smem_raw);
  SmemCarver sc{smem_raw};
  const int H = p.heads, N = p.tokens;
  const MixFwdSmem<T, Acc> sm = carve_mix_fwd<T, Acc>(sc, L, H);
  const int dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  const int chunk = static_cast<int>(blockIdx.x % L.chunks);
  const int64_t slot = blockIdx.x / L.chunks;
  const int qr = L.QC * 16, row0 = chunk * qr, KT = L.KT;
  const int q_pitch = qr * L.ldq, kv_pitch = KT * L.ldkv, s_pitch = qr * L.lds, p_pitch = qr * L.ldp;
  const int o_pitch = qr * L.ldo;
  Acc* o = accumulator<Acc>(sm.o, scratch, L.o_elems);
  const ElemMap em(qr);
  const int i = row0 + em.row;  // this thread's query row in the element phases
  const int ntiles = (N + KT - 1) / KT;
  const int warp = threadIdx.x >> 5;
  load_weights<Acc>(p, sm.w);

  for (int64_t w = slot; w < p.windows; w += L.slots) {
    __syncthreads();  // previous window's output written
    load_qkv_tile<T, kVec>(p, w, 0, H, p.q_off, p.dim_k, row0, qr, sm.q, L.ldq, q_pitch);
    for (int e = threadIdx.x; e < H * o_pitch; e += blockDim.x) o[e] = Acc(0);
    for (int e = threadIdx.x; e < H * qr; e += blockDim.x) {
      sm.m[e] = wa::neg_inf<Acc>();
      sm.l[e] = Acc(0);
    }

    // pass 0: statistics of the mixed scores (left in s: pass 1 reuses them when one tile holds all keys)
    for (int t = 0; t < ntiles; ++t) {
      const int key0 = t * KT;
      __syncthreads();
      load_qkv_tile<T, kVec>(p, w, 0, H, p.k_off, p.dim_k, key0, KT, sm.kv, L.ldkv, kv_pitch);
      __syncthreads();
      mix_scores_mma<T, Acc>(sm.q, L.ldq, q_pitch, sm.kv, L.ldkv, kv_pitch, sm.s, L.lds, s_pitch, H, L.QC, KT / 16,
                             dkp);
      __syncthreads();
      const int cols = i < N ? min(KT, N - key0) : 0;  // this row's real keys in the tile
      Acc* srow = sm.s + em.row * L.lds;
      for (int c = em.col; c < cols; c += em.tpr) {
        Acc a[kCap];
        mix_scores<Acc, kCap>(p, sm.w, w, i, key0 + c, srow + c, s_pitch, a);
      }
      for (int g = 0; g < H; ++g) {  // row statistics, merged over the row's lanes in a fixed order
        Acc m = wa::neg_inf<Acc>(), l = Acc(0);
        for (int c = em.col; c < cols; c += em.tpr) stats_add(m, l, srow[g * s_pitch + c]);
        for (int off = em.tpr / 2; off >= 1; off /= 2) {
          const Acc m2 = __shfl_xor_sync(0xffffffffu, m, off);
          const Acc l2 = __shfl_xor_sync(0xffffffffu, l, off);
          stats_merge(m, l, m2, l2);
        }
        if (em.col == 0 && i < N) stats_merge(sm.m[g * qr + em.row], sm.l[g * qr + em.row], m, l);
      }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < H * qr; e += blockDim.x) {
      const int g = e / qr, r = e - g * qr;
      const Acc lse = sm.m[e] + wa::acc_log(sm.l[e]);
      sm.m[e] = lse;
      if (row0 + r < N) static_cast<Acc*>(p.lse)[(w * H + g) * N + row0 + r] = lse;
    }

    // pass 1: mixed probabilities and their product with V
    for (int t = 0; t < ntiles; ++t) {
      const int key0 = t * KT;
      const int cols = i < N ? min(KT, N - key0) : 0;
      Acc* srow = sm.s + em.row * L.lds;
      if (ntiles > 1) {
        __syncthreads();  // previous tile's P'V done with kv and pm
        load_qkv_tile<T, kVec>(p, w, 0, H, p.k_off, p.dim_k, key0, KT, sm.kv, L.ldkv, kv_pitch);
        __syncthreads();
        mix_scores_mma<T, Acc>(sm.q, L.ldq, q_pitch, sm.kv, L.ldkv, kv_pitch, sm.s, L.lds, s_pitch, H, L.QC,
                               KT / 16, dkp);
        __syncthreads();
        for (int c = em.col; c < cols; c += em.tpr) {
          Acc a[kCap];
          mix_scores<Acc, kCap>(p, sm.w, w, i, key0 + c, srow + c, s_pitch, a);
        }
      }
      __syncthreads();  // scores taken (kv free), lse visible
      load_qkv_tile<T, kVec>(p, w, 0, H, p.v_off, p.dim_v, key0, KT, sm.kv, L.ldkv, kv_pitch);
      T* prow = sm.pm + em.row * L.ldp;
      for (int c = em.col; c < KT; c += em.tpr) {
        if (c < cols) {
          to_probabilities<Acc>(H, srow + c, s_pitch, sm.m + em.row, qr);
          post_mix_to<T, Acc, kCap>(H, sm.w, srow + c, s_pitch, prow + c, p_pitch);
        } else {
          for (int g = 0; g < H; ++g) prow[g * p_pitch + c] = wa::from_acc<T>(Acc(0));
        }
      }
      __syncthreads();
      const int ntile_v = dvp / 16, items = H * L.QC * ntile_v;
      for (int item = warp; item < items; item += kMixWarps) {  // O_g += P'_g V_g
        const int g = item / (L.QC * ntile_v), rem = item - g * L.QC * ntile_v;
        const int qt = rem / ntile_v, nt = rem - qt * ntile_v;
        wa::warp_mma<true, true>(sm.pm + g * p_pitch + qt * 16 * L.ldp, L.ldp, sm.kv + g * kv_pitch + nt * 16,
                                 L.ldkv, o + g * o_pitch + qt * 16 * L.ldo + nt * 16, L.ldo, KT, true);
      }
    }
    __syncthreads();

    // epilogue: O in the output's channel layout (head g at g * dim_v)
    const Strides3& os = p.out_strides;
    for (int e = threadIdx.x; e < H * qr * p.dim_v; e += blockDim.x) {
      const int g = e / (qr * p.dim_v), rem = e - g * qr * p.dim_v;
      const int r = rem / p.dim_v, c = rem - r * p.dim_v;
      if (row0 + r >= N) continue;
      static_cast<T*>(p.out)[token_offset(p.grid, os.img, os.y, os.x, w, row0 + r) + g * p.dim_v + c] =
          wa::from_acc<T>(o[g * o_pitch + r * L.ldo + c]);
    }
  }
}

template <typename T, typename Acc>
size_t mix_fwd_smem(const MixFwdLayout& L, int H) {
  SmemCarver sc{nullptr};
  carve_mix_fwd<T, Acc>(sc, L, H);
  return sc.offset;
}

// Preferred: one key tile covering the window (pass 1 then reuses pass 0's scores), then the most
// work per block (query tiles x keys); first with O in shared memory under the two-blocks target,
// then under the device limit, then with O in global scratch. L.QC == 0: nothing fits.
template <typename T, typename Acc>
MixFwdLayout plan_mix_fwd(const WindowAttentionParams& p, size_t smem_limit, size_t* smem) {
  const int H = p.heads, dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  const int qtiles = (p.tokens + 15) / 16;
  MixFwdLayout best{};
  for (int pass = force_scratch() ? 2 : 0; pass < 3 && best.QC == 0; ++pass) {
    const size_t budget = pass == 0 ? std::min(kMixSmemTarget, smem_limit) : smem_limit;
    int best_score = 0;
    for (int QC : {4, 2, 1}) {
      if (QC > qtiles && QC > 1) continue;
      for (int KT : {64, 32, 16}) {
        if (QC * 16 * KT > kMixMaxFwdTileElems || (KT > round16(p.tokens) && KT > 16)) continue;
        MixFwdLayout L{QC, KT, (qtiles + QC - 1) / QC, 1, wa::ld_in(dkp), wa::ld_in(std::max(dkp, dvp)),
                       wa::ld_acc(KT), wa::ld_in(KT), wa::ld_acc(dvp), pass < 2, 0};
        L.o_elems = round64(static_cast<int64_t>(H) * QC * 16 * L.ldo);
        const size_t bytes = mix_fwd_smem<T, Acc>(L, H);
        const int score = QC * KT + (KT >= p.tokens ? 1 << 16 : 0);
        if (bytes <= budget && score > best_score) {
          best = L;
          best_score = score;
          *smem = bytes;
        }
      }
    }
  }
  if (best.QC != 0) best.slots = mix_slots(p.windows, best.chunks, !best.o_smem, p.windows);
  return best;
}

template <typename T, int kCap>
int head_mix_forward_typed(const WindowAttentionParams& p, void* workspace, cudaStream_t stream) {
  using Acc = typename wa::AccOf<T>::type;
  size_t smem = 0;
  const MixFwdLayout L = plan_mix_fwd<T, Acc>(p, device_smem_optin(), &smem);
  if (L.QC == 0) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (p.bias_buffer != nullptr) {
    auto fill = head_mix_table_kernel<Acc>;
    VF_LAUNCH(fill, blocks_for(static_cast<int64_t>(p.heads) * p.tokens * p.tokens, 256), 256, 0, stream, p);
  }
  auto kernel = head_mix_fwd_kernel<T, Acc, false, kCap>;
  if constexpr (sizeof(T) == 2) {
    if (vec_ok<T>(p, nullptr)) kernel = head_mix_fwd_kernel<T, Acc, true, kCap>;
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  VF_LAUNCH(kernel, static_cast<unsigned>(L.slots * L.chunks), kMixThreads, smem, stream, p, L,
            static_cast<Acc*>(workspace));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int64_t head_mix_forward_workspace_typed(const WindowAttentionParams& p) {
  using Acc = typename wa::AccOf<T>::type;
  size_t smem = 0;
  const MixFwdLayout L = plan_mix_fwd<T, Acc>(p, device_smem_optin(), &smem);
  if (L.QC == 0) return -1;
  return L.o_smem ? 0 : L.slots * L.chunks * L.o_elems;
}

}  // namespace
}  // namespace vitfast
