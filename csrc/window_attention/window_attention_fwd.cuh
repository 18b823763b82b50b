// Plain window attention, forward kernel and its launch planning (see window_attention_cuda.cu for
// the design). Included by window_attention_cuda.cu only.
#pragma once

#include "window_attention_device.cuh"
#include "window_attention_reg.cuh"

namespace vitfast {
namespace {  // one translation unit: window_attention_cuda.cu (or the CUDA emulator binding)

constexpr int kKeyTile = 64;  // keys per forward tile
constexpr int kFwdWarps = 4;
constexpr size_t kFwdSmemTarget = 100 * 1024;  // two blocks per SM
constexpr int kMaxQueryTilesPerBlock = 8;

// ---------------------------------------------------------------------------------------------
// Forward

struct FwdLayout {
  int G, QC, groups, chunks;
  int ldq, ldv, ldo, lds, ldp;
};

template <typename T, typename Acc>
struct FwdSmem {
  T *q, *k, *v;
  Acc *o, *m, *l;
  Acc* s;  // per warp 16 x lds
  T* pm;   // per warp 16 x ldp
};

template <typename T, typename Acc>
__host__ __device__ FwdSmem<T, Acc> carve_fwd(SmemCarver& sc, const FwdLayout& L, int dkp, int dvp) {
  FwdSmem<T, Acc> s;
  const int qr = L.QC * 16;
  s.q = sc.take<T>(static_cast<size_t>(L.G) * qr * L.ldq);
  s.k = sc.take<T>(static_cast<size_t>(L.G) * kKeyTile * L.ldq);
  s.v = sc.take<T>(static_cast<size_t>(L.G) * kKeyTile * L.ldv);
  s.o = sc.take<Acc>(static_cast<size_t>(L.G) * qr * L.ldo);
  s.m = sc.take<Acc>(static_cast<size_t>(L.G) * qr);
  s.l = sc.take<Acc>(static_cast<size_t>(L.G) * qr);
  s.s = sc.take<Acc>(static_cast<size_t>(kFwdWarps) * 16 * L.lds);
  s.pm = sc.take<T>(static_cast<size_t>(kFwdWarps) * 16 * L.ldp);
  (void)dkp;
  (void)dvp;
  return s;
}

template <typename T, typename Acc, bool kVec>
__global__ void __launch_bounds__(kFwdWarps * 32)
    window_attention_fwd_kernel(const WindowAttentionParams p, const FwdLayout L) {
  VF_DYNAMIC_SMEM(smem_raw);
  SmemCarver sc{smem_raw};
  const int dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  const FwdSmem<T, Acc> sm = carve_fwd<T, Acc>(sc, L, dkp, dvp);

  const BlockWork bw = block_work(L.chunks, L.groups, L.G, p.heads);
  const int64_t w = bw.outer;
  const int chunk = bw.chunk, h0 = bw.h0, heads = bw.heads;
  const int qr = L.QC * 16;
  const int row0 = chunk * qr;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Acc scale = static_cast<Acc>(p.scale);

  load_qkv_tile<T, kVec>(p, w, h0, heads, p.q_off, p.dim_k, row0, qr, sm.q, L.ldq, qr * L.ldq);
  for (int e = threadIdx.x; e < heads * qr * L.ldo; e += blockDim.x) sm.o[e] = Acc(0);
  for (int e = threadIdx.x; e < heads * qr; e += blockDim.x) {
    sm.m[e] = wa::neg_inf<Acc>();
    sm.l[e] = Acc(0);
  }

  Acc* s_w = sm.s + warp * 16 * L.lds;
  T* p_w = sm.pm + warp * 16 * L.ldp;
  const int items = heads * L.QC;
  for (int key0 = 0; key0 < p.tokens; key0 += kKeyTile) {
    __syncthreads();  // previous tile fully consumed (and Q/O/m/l initialised)
    load_qkv_tile<T, kVec>(p, w, h0, heads, p.k_off, p.dim_k, key0, kKeyTile, sm.k, L.ldq, kKeyTile * L.ldq);
    load_qkv_tile<T, kVec>(p, w, h0, heads, p.v_off, p.dim_v, key0, kKeyTile, sm.v, L.ldv, kKeyTile * L.ldv);
    __syncthreads();
    const int ncols = min(kKeyTile, p.tokens - key0);
    const int nsub = (ncols + 15) / 16;
    for (int item = warp; item < items; item += kFwdWarps) {
      const int gh = item / L.QC, qt = item - gh * L.QC;
      const int qrow0 = row0 + qt * 16;
      if (qrow0 >= p.tokens) continue;
      const T* q_t = sm.q + gh * qr * L.ldq + qt * 16 * L.ldq;
      const T* k_h = sm.k + gh * kKeyTile * L.ldq;
      const T* v_h = sm.v + gh * kKeyTile * L.ldv;
      for (int j = 0; j < nsub; ++j) {
        wa::warp_mma<true, false>(q_t, L.ldq, k_h + j * 16 * L.ldq, L.ldq, s_w + j * 16, L.lds, dkp, false);
      }
      __syncwarp();

      // Online softmax: two lanes per query row, each over half of the tile's columns.
      const int r = lane >> 1, half = lane & 1;
      const int i = qrow0 + r;
      const int h = h0 + gh;
      Acc* m_row = sm.m + gh * qr + qt * 16 + r;
      Acc* l_row = sm.l + gh * qr + qt * 16 + r;
      const Acc m_old = *m_row, l_old = *l_row;
      Acc mx = wa::neg_inf<Acc>();
      const int c_begin = half * (kKeyTile / 2), c_end = min(c_begin + kKeyTile / 2, nsub * 16);
      const Acc* brow = bias_row<Acc>(p, w, h, i);
      // The lane's bias values first, all loads in flight at once (a register array: the loop is
      // unrolled), then the scores: loads interleaved with the shared-memory stores below would
      // wait one L2 round trip each, as the compiler cannot tell the two pointers apart.
      constexpr int kHalf = kKeyTile / 2;
      Acc bias_v[kHalf];
#pragma unroll
      for (int t = 0; t < kHalf; ++t) {
        const int c = c_begin + t;
        bias_v[t] = (i < p.tokens && c < ncols) ? bias_of<Acc>(p, brow, w, h, i, key0 + c) : Acc(0);
      }
#pragma unroll
      for (int t = 0; t < kHalf; ++t) {
        const int c = c_begin + t;
        if (c < c_end) {
          Acc sv = wa::neg_inf<Acc>();
          if (i < p.tokens && c < ncols) sv = s_w[r * L.lds + c] * scale + bias_v[t];
          s_w[r * L.lds + c] = sv;
          mx = max(mx, sv);
        }
      }
      mx = max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const Acc m_new = max(m_old, mx);
      const bool empty = m_new == wa::neg_inf<Acc>();  // nothing unmasked yet: keep O, l at 0
      const Acc alpha = empty ? Acc(1) : wa::acc_exp(m_old - m_new);
      Acc sum = 0;
      for (int c = c_begin; c < c_end; ++c) {
        const Acc e = empty ? Acc(0) : wa::acc_exp(s_w[r * L.lds + c] - m_new);
        sum += e;
        p_w[r * L.ldp + c] = wa::from_acc<T>(e);
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      Acc* o_row = sm.o + (gh * qr + qt * 16 + r) * L.ldo;
      for (int c = half * (dvp / 2); c < (half + 1) * (dvp / 2); ++c) o_row[c] *= alpha;
      __syncwarp();
      if (half == 0) {
        *m_row = m_new;
        *l_row = l_old * alpha + sum;
      }
      __syncwarp();

      Acc* o_t = sm.o + (gh * qr + qt * 16) * L.ldo;
      for (int n = 0; n < dvp; n += 16) {
        wa::warp_mma<true, true>(p_w, L.ldp, v_h + n, L.ldv, o_t + n, L.ldo, nsub * 16, true);
      }
      __syncwarp();
    }
  }
  __syncthreads();

  // Epilogue: out = O / l in the output's channel layout, lse = m + log(l).
  const Strides3& os = p.out_strides;
  constexpr int kChunk = kVec ? 8 : 1;
  const int chunks = p.dim_v / kChunk;  // kVec: dim_v % 8 == 0
  for (int e = threadIdx.x; e < heads * qr * chunks; e += blockDim.x) {
    const int gh = e / (qr * chunks), rem = e - gh * qr * chunks;
    const int r = rem / chunks, c = (rem - r * chunks) * kChunk;
    const int i = row0 + r;
    if (i >= p.tokens) continue;
    const Acc inv_l = Acc(1) / sm.l[gh * qr + r];
    const Acc* o = sm.o + (gh * qr + r) * L.ldo + c;
    T* dst = static_cast<T*>(p.out) + token_offset(p.grid, os.img, os.y, os.x, w, i) + (h0 + gh) * p.dim_v + c;
    if constexpr (kVec) {
      alignas(16) T vals[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) vals[j] = wa::from_acc<T>(o[j] * inv_l);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
    } else {
      *dst = wa::from_acc<T>(o[0] * inv_l);
    }
  }
  for (int e = threadIdx.x; e < heads * qr; e += blockDim.x) {
    const int gh = e / qr, r = e - gh * qr;
    const int i = row0 + r;
    if (i >= p.tokens) continue;
    static_cast<Acc*>(p.lse)[(w * p.heads + h0 + gh) * p.tokens + i] = sm.m[e] + wa::acc_log(sm.l[e]);
  }
}

template <typename T, typename Acc>
size_t fwd_smem(const FwdLayout& L, int dkp, int dvp) {
  SmemCarver sc{nullptr};
  carve_fwd<T, Acc>(sc, L, dkp, dvp);
  return sc.offset;
}

// Largest work per block (heads x query tiles) that fits the target; all heads first.
template <typename T, typename Acc>
FwdLayout plan_fwd(const WindowAttentionParams& p, size_t smem_limit, size_t* smem) {
  const int dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  const int qtiles = (p.tokens + 15) / 16;
  FwdLayout best{};
  size_t best_smem = 0;
  int best_work = 0;
  const size_t target = std::min(kFwdSmemTarget, smem_limit);
  for (int pass = 0; pass < 2 && best_work == 0; ++pass) {
    const size_t budget = pass == 0 ? target : smem_limit;
    for (int G = p.heads; G >= 1; --G) {
      for (int QC = std::min(qtiles, kMaxQueryTilesPerBlock); QC >= 1; --QC) {
        FwdLayout L{G, QC, (p.heads + G - 1) / G, (qtiles + QC - 1) / QC, wa::ld_in(dkp), wa::ld_in(dvp),
                    wa::ld_acc(dvp), wa::ld_acc(kKeyTile), wa::ld_in(kKeyTile)};
        const size_t bytes = fwd_smem<T, Acc>(L, dkp, dvp);
        if (bytes <= budget && G * QC > best_work) {
          best = L;
          best_smem = bytes;
          best_work = G * QC;
        }
      }
    }
  }
  *smem = best_smem;
  return best;
}


template <typename T>
int forward_typed(const WindowAttentionParams& p, cudaStream_t stream) {
  using Acc = typename wa::AccOf<T>::type;
  fill_bias_buffer<Acc>(p, stream);
  if constexpr (sizeof(T) == 2) {
    if (reg_route_ok<T>(p)) return reg_head_dim(p) == 32 ? forward_reg<T, 32>(p, stream) : forward_reg<T, 64>(p, stream);
  }
  size_t smem = 0;
  const FwdLayout L = plan_fwd<T, Acc>(p, device_smem_optin(), &smem);
  if (smem == 0) return static_cast<int>(cudaErrorInvalidConfiguration);
  auto kernel = window_attention_fwd_kernel<T, Acc, false>;
  if constexpr (sizeof(T) == 2) {
    if (vec_ok<T>(p, nullptr)) kernel = window_attention_fwd_kernel<T, Acc, true>;
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t blocks = p.windows * L.groups * L.chunks;
  VF_LAUNCH(kernel, static_cast<unsigned>(blocks), kFwdWarps * 32, smem, stream, p, L);
  return static_cast<int>(cudaGetLastError());
}
}  // namespace
}  // namespace vitfast
