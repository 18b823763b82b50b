// Windowed attention with a gathered bias on CUDA (torch-free).
//
// Forward: one block per (window, head group, query chunk); all heads of a window sit in one
// block whenever shared memory allows (small windows then get enough work per block, and a
// head-mixing transform across heads -- MiniViT -- can become a compile-time feature of this
// kernel). Keys stream through shared memory in tiles of 64; each warp owns 16-query-row work
// items (head, query tile) with an online softmax (running max / sum per row, fp32 output
// accumulator in shared memory). Products run on tensor cores for fp16/bf16 (WMMA), SIMT for
// fp32/fp64. The bias table gather and the shifted-window mask are read inside the softmax step;
// no (heads, N, N) bias is ever materialised.
//
// Backward (FlashAttention-2 style, recomputing P from the saved log-sum-exp): one block per
// (window slot, head group, key chunk) holds K, V and fp32 dK, dV for its keys and streams query
// tiles; dQ is summed across the block's key tiles in shared memory. Blocks loop over windows
// (w = slot, slot + slots, ...) and add dS into a per-slot bias-gradient partial that no other
// block touches; a last pass sums the slots in a fixed order, so the table gradient is
// deterministic.
#include <algorithm>
#include <cstdio>

#include "../common/cuda_compat.cuh"
#include "../common/cuda_dtype.cuh"
#include "window_attention.h"
#include "window_attention_tiles.cuh"

namespace vitfast {
namespace {

using wa::round16;
using wa::SmemCarver;

constexpr int kKeyTile = 64;  // keys per forward tile
constexpr int kFwdWarps = 4;
constexpr int kBwdWarps = 8;
constexpr size_t kFwdSmemTarget = 100 * 1024;  // two blocks per SM
constexpr int kMaxQueryTilesPerBlock = 8;

// ---------------------------------------------------------------------------------------------
// Element access shared by both kernels.

template <typename T>
__device__ __forceinline__ T load_qkv(const WindowAttentionParams& p, int64_t w, int t, int chan) {
  const Strides3& s = p.qkv_strides;
  return static_cast<const T*>(p.qkv)[token_offset(p.grid, s.img, s.y, s.x, w, t) + chan];
}

// table[h, index[i, j]] + mask[w % mask_windows, i, j]; traps (like PyTorch's index asserts) on
// an index outside the table.
template <typename Acc>
__device__ __forceinline__ Acc bias_at(const WindowAttentionParams& p, int64_t w, int h, int i, int j) {
  Acc b = 0;
  const int64_t e = static_cast<int64_t>(i) * p.tokens + j;
  if (p.table != nullptr) {
    const int64_t l = p.index_int64 ? static_cast<const int64_t*>(p.index)[e] : static_cast<const int32_t*>(p.index)[e];
    if (l < 0 || l >= p.table_len) {
      printf("vitfast.window_attention: bias_index[%d, %d] = %lld outside the table's [0, %lld)\n", i, j,
             static_cast<long long>(l), static_cast<long long>(p.table_len));
      __trap();
    }
    b = load_as<Acc>(p.table, p.table_dtype, h * p.table_stride_h + l * p.table_stride_l);
  }
  if (p.mask != nullptr) {
    b += load_as<Acc>(p.mask, p.mask_dtype, (w % p.mask_windows) * p.tokens * p.tokens + e);
  }
  return b;
}

// Row i of head h's bias for window w: the precomputed buffer when there is one (one load per
// score), else null (the caller gathers with bias_at).
template <typename Acc>
__device__ __forceinline__ const Acc* bias_row(const WindowAttentionParams& p, int64_t w, int h, int i) {
  if (p.bias_buffer == nullptr || i >= p.tokens) return nullptr;
  const int64_t type = p.mask != nullptr ? w % p.mask_windows : 0;
  return static_cast<const Acc*>(p.bias_buffer) + ((type * p.heads + h) * p.tokens + i) * p.tokens;
}

template <typename Acc>
__device__ __forceinline__ Acc bias_of(const WindowAttentionParams& p, const Acc* row, int64_t w, int h, int i, int j) {
  return row != nullptr ? row[j] : bias_at<Acc>(p, w, h, i, j);
}

// Fills the bias buffer: table[h, index[i, j]] + mask[type, i, j].
template <typename Acc>
__global__ void window_attention_bias_kernel(const WindowAttentionParams p) {
  const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens;
  const int64_t total = window_attention_bias_elements(p);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ij = e % nn, th = e / nn;
    const int h = static_cast<int>(th % p.heads);
    const int64_t type = th / p.heads;  // a window index whose mask type is `type`
    static_cast<Acc*>(p.bias_buffer)[e] =
        bias_at<Acc>(p, type, h, static_cast<int>(ij / p.tokens), static_cast<int>(ij % p.tokens));
  }
}

// rows x dim tile of one role (q, k or v) for `heads` heads into shared memory (ld = row pitch),
// zero beyond the tokens and beyond dim (up to the padded width). With kVec, 16-byte chunks of 8
// elements (the host checked alignment of pointer, strides, offsets and dims), one address
// computation per chunk.
template <typename T, bool kVec>
__device__ void load_tile(const WindowAttentionParams& p, const void* src, const Strides3& s, int64_t w, int h0,
                          int heads, int role_off, int head_stride, int dim, int row0, int rows, T* dst, int ld,
                          int head_pitch) {
  const int dpad = round16(dim);
  constexpr int kChunk = kVec ? 8 : 1;
  const int chunks = dpad / kChunk;
  const int per_head = rows * chunks;
  for (int e = threadIdx.x; e < heads * per_head; e += blockDim.x) {
    const int gh = e / per_head, rem = e - gh * per_head;
    const int r = rem / chunks, c = (rem - r * chunks) * kChunk;
    const int t = row0 + r;
    T* out = dst + gh * head_pitch + r * ld + c;
    const bool valid = t < p.tokens && c < dim;
    const int64_t off = valid ? token_offset(p.grid, s.img, s.y, s.x, w, t) + role_off + (h0 + gh) * head_stride + c
                              : 0;
    if constexpr (kVec) {
      uint4 v = make_uint4(0, 0, 0, 0);
      if (valid) v = *reinterpret_cast<const uint4*>(static_cast<const T*>(src) + off);
      *reinterpret_cast<uint4*>(out) = v;
    } else {
      *out = valid ? static_cast<const T*>(src)[off] : wa::zero<T>();
    }
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void load_qkv_tile(const WindowAttentionParams& p, int64_t w, int h0, int heads,
                                              int role_off, int dim, int row0, int rows, T* dst, int ld,
                                              int head_pitch) {
  load_tile<T, kVec>(p, p.qkv, p.qkv_strides, w, h0, heads, role_off, p.head_stride, dim, row0, rows, dst, ld,
                     head_pitch);
}

// blockIdx.x -> (outer index: window or window slot, head group, chunk), chunk fastest.
struct BlockWork {
  int64_t outer;
  int chunk;
  int h0, heads;  // this block's heads: h0 .. h0 + heads - 1
};

__device__ __forceinline__ BlockWork block_work(int chunks, int groups, int group_heads, int total_heads) {
  int64_t bid = blockIdx.x;
  BlockWork b;
  b.chunk = static_cast<int>(bid % chunks);
  bid /= chunks;
  const int group = static_cast<int>(bid % groups);
  b.outer = bid / groups;
  b.h0 = group * group_heads;
  b.heads = min(group_heads, total_heads - b.h0);
  return b;
}

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
      for (int c = c_begin; c < c_end; ++c) {
        Acc sv = wa::neg_inf<Acc>();
        if (i < p.tokens && c < ncols) sv = s_w[r * L.lds + c] * scale + bias_of<Acc>(p, brow, w, h, i, key0 + c);
        s_w[r * L.lds + c] = sv;
        mx = max(mx, sv);
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

// ---------------------------------------------------------------------------------------------
// Backward

struct BwdLayout {
  int G, KC, groups, chunks;
  int64_t slots;
  int ldq, ldv, ldk_acc, ldv_acc;
};

template <typename T, typename Acc>
struct BwdSmem {
  T *k, *v, *q, *dout;
  Acc *dk, *dv, *dq, *lse, *dd;
  Acc *s, *dp;        // per warp 16 x 20
  T *pm, *ds;         // per warp 16 x 24
};

constexpr int kLdS = 20, kLdP = 24;

template <typename T, typename Acc>
__host__ __device__ BwdSmem<T, Acc> carve_bwd(SmemCarver& sc, const BwdLayout& L) {
  BwdSmem<T, Acc> s;
  const size_t kr = static_cast<size_t>(L.KC) * 16;
  s.k = sc.take<T>(L.G * kr * L.ldq);
  s.v = sc.take<T>(L.G * kr * L.ldv);
  s.dk = sc.take<Acc>(L.G * kr * L.ldk_acc);
  s.dv = sc.take<Acc>(L.G * kr * L.ldv_acc);
  s.q = sc.take<T>(static_cast<size_t>(L.G) * 16 * L.ldq);
  s.dout = sc.take<T>(static_cast<size_t>(L.G) * 16 * L.ldv);
  // dQ partial of each (head, key tile) item of a query tile, summed in key-tile order afterwards
  // (deterministic, no atomics)
  s.dq = sc.take<Acc>(static_cast<size_t>(L.G) * L.KC * 16 * L.ldk_acc);
  s.lse = sc.take<Acc>(static_cast<size_t>(L.G) * 16);
  s.dd = sc.take<Acc>(static_cast<size_t>(L.G) * 16);
  s.s = sc.take<Acc>(static_cast<size_t>(kBwdWarps) * 16 * kLdS);
  s.dp = sc.take<Acc>(static_cast<size_t>(kBwdWarps) * 16 * kLdS);
  s.pm = sc.take<T>(static_cast<size_t>(kBwdWarps) * 16 * kLdP);
  s.ds = sc.take<T>(static_cast<size_t>(kBwdWarps) * 16 * kLdP);
  return s;
}

// D[w, h, i] = sum_c dO[w, i, h, c] * O[w, i, h, c]  (the softmax backward's row term)
template <typename T, typename Acc>
__global__ void window_attention_bwd_dot_kernel(const WindowAttentionBackwardParams b, Acc* dd) {
  const WindowAttentionParams& p = b.fwd;
  const int64_t total = p.windows * p.heads * p.tokens;
  const Strides3& os = p.out_strides;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(e % p.tokens);
    const int64_t wh = e / p.tokens;
    const int h = static_cast<int>(wh % p.heads);
    const int64_t w = wh / p.heads;
    const int64_t off = token_offset(p.grid, os.img, os.y, os.x, w, i) + static_cast<int64_t>(h) * p.dim_v;
    const T* o = static_cast<const T*>(p.out) + off;
    const T* g = static_cast<const T*>(b.grad_out) + off;
    Acc sum = 0;
    for (int c = 0; c < p.dim_v; ++c) sum += wa::to_acc(o[c]) * wa::to_acc(g[c]);
    dd[e] = sum;
  }
}

template <typename T, typename Acc, bool kVec>
__global__ void __launch_bounds__(kBwdWarps * 32)
    window_attention_bwd_kernel(const WindowAttentionBackwardParams b, const BwdLayout L, const Acc* dd,
                                Acc* dbias_slots, Acc* dq_chunks) {
  VF_DYNAMIC_SMEM(smem_raw);
  SmemCarver sc{smem_raw};
  const BwdSmem<T, Acc> sm = carve_bwd<T, Acc>(sc, L);
  const WindowAttentionParams& p = b.fwd;
  const int dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  const int N = p.tokens;

  const BlockWork bw = block_work(L.chunks, L.groups, L.G, p.heads);
  const int64_t slot = bw.outer;
  const int chunk = bw.chunk, h0 = bw.h0, heads = bw.heads;
  const int kr = L.KC * 16;
  const int key_base = chunk * kr;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const Acc scale = static_cast<Acc>(p.scale);
  const Strides3& gs = b.grad_qkv_strides;
  Acc* dbias = dbias_slots != nullptr ? dbias_slots + slot * p.heads * N * N : nullptr;

  Acc* s_w = sm.s + warp * 16 * kLdS;
  Acc* dp_w = sm.dp + warp * 16 * kLdS;
  T* p_w = sm.pm + warp * 16 * kLdP;
  T* ds_w = sm.ds + warp * 16 * kLdP;
  const int ksubs = min(L.KC, (N - key_base + 15) / 16);  // key tiles of this chunk holding tokens
  const int items = heads * ksubs;

  for (int64_t w = slot; w < p.windows; w += L.slots) {
    __syncthreads();  // previous window's dK/dV written out
    load_qkv_tile<T, kVec>(p, w, h0, heads, p.k_off, p.dim_k, key_base, kr, sm.k, L.ldq, kr * L.ldq);
    load_qkv_tile<T, kVec>(p, w, h0, heads, p.v_off, p.dim_v, key_base, kr, sm.v, L.ldv, kr * L.ldv);
    for (int e = threadIdx.x; e < heads * kr * L.ldk_acc; e += blockDim.x) sm.dk[e] = Acc(0);
    for (int e = threadIdx.x; e < heads * kr * L.ldv_acc; e += blockDim.x) sm.dv[e] = Acc(0);

    for (int q0 = 0; q0 < N; q0 += 16) {
      __syncthreads();  // previous query tile's dQ written out
      load_qkv_tile<T, kVec>(p, w, h0, heads, p.q_off, p.dim_k, q0, 16, sm.q, L.ldq, 16 * L.ldq);
      // dO rows come from the output layout (head h at h * dim_v)
      load_tile<T, kVec>(p, b.grad_out, p.out_strides, w, h0, heads, 0, p.dim_v, p.dim_v, q0, 16, sm.dout, L.ldv,
                         16 * L.ldv);
      for (int e = threadIdx.x; e < heads * 16; e += blockDim.x) {
        const int gh = e / 16, r = e - gh * 16, i = q0 + r;
        const int64_t row = (w * p.heads + h0 + gh) * N + i;
        sm.lse[e] = i < N ? static_cast<const Acc*>(p.lse)[row] : Acc(0);
        sm.dd[e] = i < N ? dd[row] : Acc(0);
      }
      __syncthreads();

      for (int item = warp; item < items; item += kBwdWarps) {
        const int gh = item / ksubs, kk = item - gh * ksubs;
        const int h = h0 + gh;
        const T* q_h = sm.q + gh * 16 * L.ldq;
        const T* do_h = sm.dout + gh * 16 * L.ldv;
        const T* k_t = sm.k + gh * kr * L.ldq + kk * 16 * L.ldq;
        const T* v_t = sm.v + gh * kr * L.ldv + kk * 16 * L.ldv;
        wa::warp_mma<true, false>(q_h, L.ldq, k_t, L.ldq, s_w, kLdS, dkp, false);     // S = Q K^T
        wa::warp_mma<true, false>(do_h, L.ldv, v_t, L.ldv, dp_w, kLdS, dvp, false);   // dP = dO V^T
        __syncwarp();
        {
          const int r = lane >> 1, c0 = (lane & 1) * 8;
          const int i = q0 + r;
          const Acc* brow = bias_row<Acc>(p, w, h, i);
          for (int c = c0; c < c0 + 8; ++c) {
            const int j = key_base + kk * 16 + c;
            Acc pv = 0, dsv = 0;
            if (i < N && j < N) {
              const Acc sv = s_w[r * kLdS + c] * scale + bias_of<Acc>(p, brow, w, h, i, j);
              pv = wa::acc_exp(sv - sm.lse[gh * 16 + r]);
              dsv = pv * (dp_w[r * kLdS + c] - sm.dd[gh * 16 + r]);
              if (dbias != nullptr) dbias[(static_cast<int64_t>(h) * N + i) * N + j] += dsv;
            }
            p_w[r * kLdP + c] = wa::from_acc<T>(pv);
            ds_w[r * kLdP + c] = wa::from_acc<T>(dsv);
          }
        }
        __syncwarp();
        Acc* dv_t = sm.dv + (gh * kr + kk * 16) * L.ldv_acc;
        Acc* dk_t = sm.dk + (gh * kr + kk * 16) * L.ldk_acc;
        for (int n = 0; n < dvp; n += 16)  // dV += P^T dO
          wa::warp_mma<false, true>(p_w, kLdP, do_h + n, L.ldv, dv_t + n, L.ldv_acc, 16, true);
        for (int n = 0; n < dkp; n += 16)  // dK += dS^T Q (scaled at the end)
          wa::warp_mma<false, true>(ds_w, kLdP, q_h + n, L.ldq, dk_t + n, L.ldk_acc, 16, true);
        Acc* dq_t = sm.dq + (gh * L.KC + kk) * 16 * L.ldk_acc;
        for (int n = 0; n < dkp; n += 16)  // this key tile's share of dQ = dS K
          wa::warp_mma<true, true>(ds_w, kLdP, k_t + n, L.ldq, dq_t + n, L.ldk_acc, 16, false);
        __syncwarp();  // the next item's P / dS overwrite this warp's scratch
      }
      __syncthreads();

      // dQ of this query tile: straight into grad_qkv when one chunk covers all keys, else into
      // this chunk's partial (summed in order by the reduce kernel).
      for (int e = threadIdx.x; e < heads * 16 * p.dim_k; e += blockDim.x) {
        const int gh = e / (16 * p.dim_k), rem = e - gh * 16 * p.dim_k;
        const int r = rem / p.dim_k, c = rem - r * p.dim_k;
        const int i = q0 + r;
        if (i >= N) continue;
        Acc sum = 0;
        for (int kk = 0; kk < ksubs; ++kk) sum += sm.dq[((gh * L.KC + kk) * 16 + r) * L.ldk_acc + c];
        const Acc v = scale * sum;
        const int h = h0 + gh;
        if (L.chunks == 1) {
          static_cast<T*>(b.grad_qkv)[token_offset(p.grid, gs.img, gs.y, gs.x, w, i) + p.q_off + h * p.head_stride +
                                      c] = wa::from_acc<T>(v);
        } else {
          dq_chunks[((chunk * p.windows + w) * N + i) * p.heads * p.dim_k + h * p.dim_k + c] = v;
        }
      }
    }
    __syncthreads();

    // dK, dV of this chunk's keys
    for (int e = threadIdx.x; e < heads * kr * p.dim_k; e += blockDim.x) {
      const int gh = e / (kr * p.dim_k), rem = e - gh * kr * p.dim_k;
      const int r = rem / p.dim_k, c = rem - r * p.dim_k;
      const int j = key_base + r;
      if (j >= N) continue;
      static_cast<T*>(b.grad_qkv)[token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + p.k_off +
                                  (h0 + gh) * p.head_stride + c] =
          wa::from_acc<T>(scale * sm.dk[(gh * kr + r) * L.ldk_acc + c]);
    }
    for (int e = threadIdx.x; e < heads * kr * p.dim_v; e += blockDim.x) {
      const int gh = e / (kr * p.dim_v), rem = e - gh * kr * p.dim_v;
      const int r = rem / p.dim_v, c = rem - r * p.dim_v;
      const int j = key_base + r;
      if (j >= N) continue;
      static_cast<T*>(b.grad_qkv)[token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + p.v_off +
                                  (h0 + gh) * p.head_stride + c] =
          wa::from_acc<T>(sm.dv[(gh * kr + r) * L.ldv_acc + c]);
    }
  }
}

// grad_qkv's q part = sum over key chunks of the dQ partials, in chunk order.
template <typename T, typename Acc>
__global__ void window_attention_dq_reduce_kernel(const WindowAttentionBackwardParams b, const Acc* dq_chunks,
                                                  int chunks) {
  const WindowAttentionParams& p = b.fwd;
  const int64_t per_chunk = p.windows * p.tokens * p.heads * p.dim_k;
  const Strides3& gs = b.grad_qkv_strides;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < per_chunk;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = 0;
    for (int c = 0; c < chunks; ++c) sum += dq_chunks[c * per_chunk + e];
    const int c = static_cast<int>(e % p.dim_k);
    int64_t rest = e / p.dim_k;
    const int h = static_cast<int>(rest % p.heads);
    rest /= p.heads;
    const int i = static_cast<int>(rest % p.tokens);
    const int64_t w = rest / p.tokens;
    static_cast<T*>(b.grad_qkv)[token_offset(p.grid, gs.img, gs.y, gs.x, w, i) + p.q_off + h * p.head_stride + c] =
        wa::from_acc<T>(sum);
  }
}

// dbias = sum over slots, in slot order (deterministic).
template <typename Acc>
__global__ void window_attention_dbias_reduce_kernel(const Acc* slots, int64_t nslots, int64_t per_slot, Acc* dbias) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < per_slot;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = 0;
    for (int64_t s = 0; s < nslots; ++s) sum += slots[s * per_slot + e];
    dbias[e] = sum;
  }
}

template <typename T, typename Acc>
size_t bwd_smem(const BwdLayout& L) {
  SmemCarver sc{nullptr};
  carve_bwd<T, Acc>(sc, L);
  return sc.offset;
}

int device_sms() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms > 0 ? sms : 1;
}

size_t device_smem_optin() {
  int dev = 0, bytes = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return static_cast<size_t>(bytes);
}

// Most (heads x key tiles) per block that fits; all heads first, keys of one window in one block
// when possible (then dQ needs no partials). Slots: enough blocks to fill the GPU when a bias
// gradient is summed across windows, one window per block otherwise.
template <typename T, typename Acc>
BwdLayout plan_bwd(const WindowAttentionBackwardParams& b, size_t smem_limit, size_t* smem) {
  const WindowAttentionParams& p = b.fwd;
  const int dkp = round16(p.dim_k), dvp = round16(p.dim_v);
  const int ktiles = (p.tokens + 15) / 16;
  BwdLayout best{};
  int best_work = 0;
  size_t best_smem = 0;
  for (int G = p.heads; G >= 1; --G) {
    for (int KC = ktiles; KC >= 1; --KC) {
      BwdLayout L{G, KC, (p.heads + G - 1) / G, (ktiles + KC - 1) / KC, 1, wa::ld_in(dkp), wa::ld_in(dvp),
                  wa::ld_acc(dkp), wa::ld_acc(dvp)};
      const size_t bytes = bwd_smem<T, Acc>(L);
      if (bytes <= smem_limit && G * KC > best_work) {
        best = L;
        best_work = G * KC;
        best_smem = bytes;
      }
    }
  }
  if (best_work == 0) {
    *smem = 0;
    return best;
  }
  if (b.dbias != nullptr) {
    const int64_t per_slot = static_cast<int64_t>(p.heads) * p.tokens * p.tokens;
    const int64_t want = std::max<int64_t>(1, 2LL * device_sms() / (best.groups * best.chunks));
    const int64_t cap = std::max<int64_t>(1, (int64_t{256} << 20) / static_cast<int64_t>(sizeof(Acc) * per_slot));
    best.slots = std::min<int64_t>({p.windows, want, cap});
  } else {
    best.slots = p.windows;
  }
  *smem = best_smem;
  return best;
}

int blocks_for(int64_t total, int threads) {
  return static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 65535LL * 32));
}

// 16-byte chunks of 8 elements everywhere: 16-bit types, aligned pointers, every stride, offset
// and head dim a multiple of 8 elements (Swin's and TinyViT's layouts all are).
template <typename T>
bool vec_ok(const WindowAttentionParams& p, const void* grad_out) {
  if (sizeof(T) != 2) return false;
  auto al = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto m8 = [](int64_t v) { return v % 8 == 0; };
  const Strides3 &q = p.qkv_strides, &o = p.out_strides;
  return al(p.qkv) && al(p.out) && (grad_out == nullptr || al(grad_out)) && m8(q.img) && m8(q.y) && m8(q.x) &&
         m8(o.img) && m8(o.y) && m8(o.x) && m8(p.q_off) && m8(p.k_off) && m8(p.v_off) && m8(p.head_stride) &&
         m8(p.dim_k) && m8(p.dim_v);
}

template <typename Acc>
void fill_bias_buffer(const WindowAttentionParams& p, cudaStream_t stream) {
  if (p.bias_buffer == nullptr) return;
  auto kernel = window_attention_bias_kernel<Acc>;
  VF_LAUNCH(kernel, blocks_for(window_attention_bias_elements(p), 256), 256, 0, stream, p);
}

template <typename T>
int forward_typed(const WindowAttentionParams& p, cudaStream_t stream) {
  using Acc = typename wa::AccOf<T>::type;
  fill_bias_buffer<Acc>(p, stream);
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

template <typename T>
struct BwdWorkspace {
  using Acc = typename wa::AccOf<T>::type;
  int64_t dd = 0, slots = 0, dq = 0;  // element counts
  int64_t total() const { return dd + slots + dq; }
};

template <typename T>
BwdWorkspace<T> workspace_for(const WindowAttentionBackwardParams& b, const BwdLayout& L) {
  const WindowAttentionParams& p = b.fwd;
  BwdWorkspace<T> ws;
  ws.dd = p.windows * p.heads * p.tokens;
  ws.slots = b.dbias != nullptr ? L.slots * p.heads * p.tokens * p.tokens : 0;
  ws.dq = L.chunks > 1 ? L.chunks * p.windows * p.tokens * p.heads * p.dim_k : 0;
  return ws;
}

template <typename T>
int64_t workspace_typed(const WindowAttentionBackwardParams& b) {
  using Acc = typename wa::AccOf<T>::type;
  size_t smem = 0;
  const BwdLayout L = plan_bwd<T, Acc>(b, device_smem_optin(), &smem);
  if (smem == 0) return -1;
  return workspace_for<T>(b, L).total();
}

template <typename T>
int backward_typed(const WindowAttentionBackwardParams& b, void* workspace, cudaStream_t stream) {
  using Acc = typename wa::AccOf<T>::type;
  const WindowAttentionParams& p = b.fwd;
  size_t smem = 0;
  const BwdLayout L = plan_bwd<T, Acc>(b, device_smem_optin(), &smem);
  if (smem == 0) return static_cast<int>(cudaErrorInvalidConfiguration);
  const BwdWorkspace<T> ws = workspace_for<T>(b, L);
  fill_bias_buffer<Acc>(p, stream);
  Acc* dd = static_cast<Acc*>(workspace);
  Acc* slots = ws.slots ? dd + ws.dd : nullptr;
  Acc* dq = ws.dq ? dd + ws.dd + ws.slots : nullptr;
  constexpr int kThreads = 256;
  auto dot_kernel = window_attention_bwd_dot_kernel<T, Acc>;
  VF_LAUNCH(dot_kernel, blocks_for(ws.dd, kThreads), kThreads, 0, stream, b, dd);
  if (slots != nullptr) {
    cudaError_t err = cudaMemsetAsync(slots, 0, ws.slots * sizeof(Acc), stream);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  auto kernel = window_attention_bwd_kernel<T, Acc, false>;
  if constexpr (sizeof(T) == 2) {
    if (vec_ok<T>(p, b.grad_out)) kernel = window_attention_bwd_kernel<T, Acc, true>;
  }
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t blocks = L.slots * L.groups * L.chunks;
  VF_LAUNCH(kernel, static_cast<unsigned>(blocks), kBwdWarps * 32, smem, stream, b, L, dd, slots, dq);
  if (dq != nullptr) {
    auto reduce = window_attention_dq_reduce_kernel<T, Acc>;
    VF_LAUNCH(reduce, blocks_for(ws.dq / L.chunks, kThreads), kThreads, 0, stream, b, dq, L.chunks);
  }
  if (slots != nullptr) {
    const int64_t per_slot = static_cast<int64_t>(p.heads) * p.tokens * p.tokens;
    auto reduce = window_attention_dbias_reduce_kernel<Acc>;
    VF_LAUNCH(reduce, blocks_for(per_slot, kThreads), kThreads, 0, stream, slots, L.slots, per_slot,
              static_cast<Acc*>(b.dbias));
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename Acc>
__global__ void window_attention_segment_sum_kernel(const Acc* dbias, const int64_t* order, const int64_t* bounds,
                                                    int64_t heads, int64_t L, int64_t nn, Acc* out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < heads * L;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t h = e / L, l = e - h * L;
    Acc sum = 0;
    for (int64_t k = bounds[l]; k < bounds[l + 1]; ++k) sum += dbias[h * nn + order[k]];
    out[e] = sum;
  }
}

}  // namespace

int window_attention_segment_sum_cuda(const void* dbias, bool f64, const int64_t* order, const int64_t* bounds,
                                      int64_t heads, int64_t L, int64_t nn, void* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (f64) {
    auto k = window_attention_segment_sum_kernel<double>;
    VF_LAUNCH(k, blocks_for(heads * L, 256), 256, 0, s, static_cast<const double*>(dbias), order, bounds, heads, L,
              nn, static_cast<double*>(out));
  } else {
    auto k = window_attention_segment_sum_kernel<float>;
    VF_LAUNCH(k, blocks_for(heads * L, 256), 256, 0, s, static_cast<const float*>(dbias), order, bounds, heads, L,
              nn, static_cast<float*>(out));
  }
  return static_cast<int>(cudaGetLastError());
}

int window_attention_forward_cuda(const WindowAttentionParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::kFloat16:
      return forward_typed<__half>(p, s);
    case DType::kBFloat16:
      return forward_typed<__nv_bfloat16>(p, s);
    case DType::kFloat32:
      return forward_typed<float>(p, s);
    default:
      return forward_typed<double>(p, s);
  }
}

int64_t window_attention_backward_workspace(const WindowAttentionBackwardParams& p) {
  switch (p.fwd.dtype) {
    case DType::kFloat16:
      return workspace_typed<__half>(p);
    case DType::kBFloat16:
      return workspace_typed<__nv_bfloat16>(p);
    case DType::kFloat32:
      return workspace_typed<float>(p);
    default:
      return workspace_typed<double>(p);
  }
}

int window_attention_backward_cuda(const WindowAttentionBackwardParams& p, void* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.fwd.dtype) {
    case DType::kFloat16:
      return backward_typed<__half>(p, workspace, s);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(p, workspace, s);
    case DType::kFloat32:
      return backward_typed<float>(p, workspace, s);
    default:
      return backward_typed<double>(p, workspace, s);
  }
}

}  // namespace vitfast
