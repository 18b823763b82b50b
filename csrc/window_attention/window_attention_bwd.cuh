// Plain window attention, backward kernels and their launch planning (see window_attention_cuda.cu
// for the design). Included by window_attention_cuda.cu only.
#pragma once

#include "window_attention_device.cuh"
#include "window_attention_reg.cuh"

namespace vitfast {
namespace {  // one translation unit: window_attention_cuda.cu (or the CUDA emulator binding)

constexpr int kBwdWarps = 8;

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
          Acc bias_v[8];  // loads first, all in flight (see the forward's softmax step)
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            const int j = key_base + kk * 16 + c0 + t;
            bias_v[t] = (i < N && j < N) ? bias_of<Acc>(p, brow, w, h, i, j) : Acc(0);
          }
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            const int c = c0 + t;
            const int j = key_base + kk * 16 + c;
            Acc pv = 0, dsv = 0;
            if (i < N && j < N) {
              const Acc sv = s_w[r * kLdS + c] * scale + bias_v[t];
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

template <typename T, typename Acc>
size_t bwd_smem(const BwdLayout& L) {
  SmemCarver sc{nullptr};
  carve_bwd<T, Acc>(sc, L);
  return sc.offset;
}

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
  const WindowAttentionParams& p = b.fwd;
  if constexpr (sizeof(T) == 2) {
    if (reg_route_ok<T>(p)) {  // the per-slot bias gradients
      const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens;
      return b.dbias != nullptr ? reg_bwd_slots_for<T>(b) * p.heads * nn : 0;
    }
  }
  size_t smem = 0;
  const BwdLayout L = plan_bwd<T, Acc>(b, device_smem_optin(), &smem);
  if (smem == 0) return -1;
  return workspace_for<T>(b, L).total();
}

// The register kernels' backward (16-bit, windows <= 64 tokens): the kernel (per-slot bias
// gradients in the workspace), then the in-order slot sum.
template <typename T>
int backward_reg_route(const WindowAttentionBackwardParams& b, float* workspace, cudaStream_t stream) {
  const WindowAttentionParams& p = b.fwd;
  constexpr int kThreads = 256;
  const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens;
  const int64_t slots = reg_bwd_slots_for<T>(b);
  float* slot_buf = b.dbias != nullptr ? workspace : nullptr;
  fill_bias_buffer<float>(p, stream);
  const int err = reg_head_dim(p) == 32 ? backward_reg<T, 32>(b, slot_buf, slots, stream)
                                        : backward_reg<T, 64>(b, slot_buf, slots, stream);
  if (err != 0 || slot_buf == nullptr) return err;
  auto reduce = window_attention_slot_reduce_kernel<float>;
  VF_LAUNCH(reduce, blocks_for(p.heads * nn, kThreads), kThreads, 0, stream, slot_buf, slots, p.heads * nn,
            static_cast<float*>(b.dbias));
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward_typed(const WindowAttentionBackwardParams& b, void* workspace, cudaStream_t stream) {
  using Acc = typename wa::AccOf<T>::type;
  const WindowAttentionParams& p = b.fwd;
  constexpr int kThreads = 256;
  if constexpr (sizeof(T) == 2) {
    if (reg_route_ok<T>(p)) return backward_reg_route<T>(b, static_cast<float*>(workspace), stream);
  }
  size_t smem = 0;
  const BwdLayout L = plan_bwd<T, Acc>(b, device_smem_optin(), &smem);
  if (smem == 0) return static_cast<int>(cudaErrorInvalidConfiguration);
  const BwdWorkspace<T> ws = workspace_for<T>(b, L);
  fill_bias_buffer<Acc>(p, stream);
  Acc* dd = static_cast<Acc*>(workspace);
  Acc* slots = ws.slots ? dd + ws.dd : nullptr;
  Acc* dq = ws.dq ? dd + ws.dd + ws.slots : nullptr;
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
    auto reduce = window_attention_slot_reduce_kernel<Acc>;
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
}  // namespace vitfast
