// Plain window attention for windows of at most 64 tokens in fp16/bf16 (Swin's 7 x 7 and 8 x 8,
// TinyViT's 7 x 7): register-resident kernels in the FlashAttention-2 style. Included by
// window_attention_cuda.cu only.
//
// Why a second family: the shared-memory-tile kernels (window_attention_fwd/bwd.cuh) run every
// product through WMMA fragments stored to shared memory and back, keep O and dK/dV in shared
// memory, and need ~100-150 KB per block, so an SM holds one or two blocks of a few warps. On the
// H100 they took 1.55 ms (forward) and 5.9 ms (backward) at Swin-T stage 1 against a ~0.2 ms
// floor (benchmarks/NOTES.md): latency-bound. Here S, P, O, dK and dV live in registers (mma.sync
// m16n8k16 with ldmatrix, common/mma_sm80.cuh); shared memory holds one head's Q, K, V and bias of
// one window (and dO, O, dS^T and the bias gradient in the backward): 32 KB (forward) / 69 KB
// (backward) per block at head dim 32.
//
// Forward: one block of 4 warps per (window, head); warp w owns query rows 16w..16w+15 and sees
// all (<= 64) keys at once, so the softmax needs no online rescaling.
// Backward: one block per (window slot, head) loops over windows w = slot, slot + slots, ...; warp
// w owns keys 16w..16w+15 (D = rowsum(dO * O) is computed in the block from O and dO in shared
// memory, no separate pass): S^T and dP^T (keys x queries) are recomputed in registers, dV += P^T dO
// and dK += dS^T Q accumulate in registers, dS^T goes to shared memory, and after a barrier warp w
// computes dQ of query rows 16w.. as dS K over all keys -- complete, no partials, no atomics. The
// bias gradient of the block's head accumulates across its windows and is written
// once per slot (kept in shared memory: registers are the scarce resource here); the in-order slot
// reduction makes it deterministic, like the tile kernels.
#pragma once

#include <cstdlib>
#include <cstring>

#include "../common/mma_sm80.cuh"
#include "window_attention_device.cuh"

namespace vitfast {
namespace {  // one translation unit: window_attention_cuda.cu (or the CUDA emulator binding)

constexpr int kRegTokens = 64;  // most tokens per window (4 warps x 16 rows)
constexpr int kRegWarps = 4;
constexpr int kRegLdS = kRegTokens + 8;  // dS^T row pitch (+8: ldmatrix without bank conflicts)
constexpr int kRegLdB = kRegTokens + 1;  // bias / bias-gradient row pitch (+1: spreads a quad's rows over banks)
// Resident blocks per SM the register budget is capped for (65536 / (128 threads x blocks)), the
// most that compile without spills or that shared memory allows (sm_90a, nvcc 13.0: forward 95-96
// registers at head dim 32, 98-108 at 64; backward 122-127 at 32, where 69 KB of shared memory
// allows 3 blocks anyway, and 176-188 at 64).
template <int D>
constexpr int reg_fwd_blocks_per_sm() { return D <= 32 ? 5 : 4; }  // <= 102 / 128 registers
template <int D>
constexpr int reg_bwd_blocks_per_sm() { return D <= 32 ? 3 : 2; }  // <= 170 / 255 registers

// Padded head dim of the register kernels: q/k/v/dO tiles are D wide, zero beyond the real dim.
inline int reg_head_dim(const WindowAttentionParams& p) { return std::max(p.dim_k, p.dim_v) <= 32 ? 32 : 64; }

// VITFAST_WINDOW_ATTENTION_ROUTE=tiles forces the shared-memory-tile kernels on any shape (tests,
// benchmarks comparing the two).
inline bool reg_route_disabled() {
  const char* v = std::getenv("VITFAST_WINDOW_ATTENTION_ROUTE");
  return v != nullptr && std::strcmp(v, "tiles") == 0;
}

template <typename T>
bool reg_route_ok(const WindowAttentionParams& p) {
  if (sizeof(T) != 2 || reg_route_disabled()) return false;
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major >= 8 && p.tokens <= kRegTokens && p.dim_k <= 64 && p.dim_v <= 64;
}

template <typename T, int D>
struct RegSmem {
  static constexpr int ld = D + 8;
  T *q, *k, *v, *dout, *o, *dst;  // dout, o, dst, dd, lse, dbias: backward only
  float* bias;                     // [query][key] the window's bias (table + mask), pitch kRegLdB
  float* dd;                       // D[i] = dO[i] . O[i] of the window's rows
  float* lse;                      // the forward's log-sum-exp of the window's rows
  float* dbias;                    // [key][query], summed over the block's windows
};

template <typename T, int D>
__host__ __device__ RegSmem<T, D> carve_reg(SmemCarver& sc, bool backward) {
  constexpr int ld = RegSmem<T, D>::ld;
  RegSmem<T, D> s{};
  s.q = sc.take<T>(kRegTokens * ld);
  s.k = sc.take<T>(kRegTokens * ld);
  s.v = sc.take<T>(kRegTokens * ld);
  s.bias = sc.take<float>(kRegTokens * kRegLdB);
  if (backward) {
    s.dout = sc.take<T>(kRegTokens * ld);
    s.o = sc.take<T>(kRegTokens * ld);
    s.dst = sc.take<T>(kRegTokens * kRegLdS);
    s.dd = sc.take<float>(kRegTokens);
    s.lse = sc.take<float>(kRegTokens);
    s.dbias = sc.take<float>(kRegTokens * kRegLdB);
  }
  return s;
}

template <typename T, int D>
size_t reg_smem(bool backward) {
  SmemCarver sc{nullptr};
  carve_reg<T, D>(sc, backward);
  return sc.offset;
}

// Columns [round16(dim), D) of a tile stay zero for the whole kernel (the loads never write them),
// so padded channels add nothing to the products.
template <typename T, int D>
__device__ void zero_pad_columns(T* tile, int dim) {
  constexpr int ld = D + 8;
  const int c0 = round16(dim), w = D - c0;
  for (int e = threadIdx.x; e < kRegTokens * w; e += blockDim.x) tile[(e / w) * ld + c0 + e % w] = wa::zero<T>();
}

// One role's tile source (q, k, v from qkv; dO or O from the output layout): head h's channels
// start at off + h * head_stride in rows addressed through `strides`.
struct RegRole {
  const void* src;
  Strides3 strides;
  int off, head_stride, dim;
  void* dst;
};

// Rows 0..63 of every role's tile of head h, window w, into shared memory (pitch D + 8), zero
// beyond the tokens and beyond dim. 16-byte chunks (kVec: dim % 8 == 0, aligned rows), and every
// load of the thread is issued before the first store: load_tile's loop stores each chunk before
// loading the next, so each chunk would wait a full global round trip.
template <typename T, int D, int kRoles>
__device__ __forceinline__ void load_roles_vec(const WindowAttentionParams& p, int64_t w, int h,
                                               const RegRole (&roles)[kRoles]) {
  constexpr int ld = D + 8, kPerRow = D / 8, kChunks = kRegTokens * kPerRow, kThreads = kRegWarps * 32;
  constexpr int kPer = (kChunks + kThreads - 1) / kThreads;
  uint4 v[kRoles][kPer];
#pragma unroll
  for (int r = 0; r < kRoles; ++r) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * kThreads;
      const int row = e / kPerRow, c = (e % kPerRow) * 8;
      v[r][i] = make_uint4(0, 0, 0, 0);
      if (e < kChunks && row < p.tokens && c < roles[r].dim) {
        const Strides3& st = roles[r].strides;
        const int64_t off = token_offset(p.grid, st.img, st.y, st.x, w, row) + roles[r].off +
                            static_cast<int64_t>(h) * roles[r].head_stride + c;
        v[r][i] = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(roles[r].src) + off));
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRoles; ++r) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * kThreads;
      if (e < kChunks) {
        T* dst = static_cast<T*>(roles[r].dst) + (e / kPerRow) * ld + (e % kPerRow) * 8;
        *reinterpret_cast<uint4*>(dst) = v[r][i];
      }
    }
  }
}

// The A fragment (16 x 16) of two adjacent n8 C tiles (16 x 8 each, fp32), rounded to T: how a
// score / probability tile in registers feeds the next product.
template <typename T>
__device__ __forceinline__ void c_tiles_to_a(const float (&c0)[4], const float (&c1)[4], uint32_t (&a)[4]) {
  a[0] = mma::pack2<T>(c0[0], c0[1]);
  a[1] = mma::pack2<T>(c0[2], c0[3]);
  a[2] = mma::pack2<T>(c1[0], c1[1]);
  a[3] = mma::pack2<T>(c1[2], c1[3]);
}

// acc (16 x D) += A (16 x 16) times 16 rows x D columns of a row-major shared-memory tile (`rows`
// points at the first row, pitch ld): the B operand through ldmatrix.trans.
template <typename T, int D>
__device__ __forceinline__ void mma_times_rows(float (&acc)[D / 8][4], const uint32_t (&a)[4], const T* rows, int ld,
                                               int lane) {
#pragma unroll
  for (int n0 = 0; n0 < D; n0 += 16) {
    uint32_t b[4];
    mma::ldmatrix_x4_trans(b, rows + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8);
    const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
    mma::mma_16816<T>(acc[n0 / 8], a, b0);
    mma::mma_16816<T>(acc[n0 / 8 + 1], a, b1);
  }
}

// Stores a 16 x D fp32 register tile (C fragments acc[D/8][4], rows row0 + g and row0 + g + 8)
// times `mul` into dst(row, c) for rows < tokens and c < dim. kVec: dim % 8 == 0 and 16-byte
// aligned rows, so each (row, 2t) pair is one 32-bit store.
template <typename T, int D, bool kVec, typename RowPtr>
__device__ __forceinline__ void store_rows(const float (&acc)[D / 8][4], float mul, int row0, int tokens, int dim,
                                           RowPtr row_ptr) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g + 8 * half;
    if (r >= tokens) continue;
    T* dst = row_ptr(r);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int c = 8 * n + 2 * t;
      if (c >= dim) continue;
      const float x0 = acc[n][2 * half] * mul, x1 = acc[n][2 * half + 1] * mul;
      if constexpr (kVec) {
        *reinterpret_cast<uint32_t*>(dst + c) = mma::pack2<T>(x0, x1);
      } else {
        dst[c] = wa::from_acc<T>(x0);
        if (c + 1 < dim) dst[c + 1] = wa::from_acc<T>(x1);
      }
    }
  }
}

// Head h's bias for window w as a row-major N x N array (the precomputed buffer), or null when
// there is no buffer (then the stage below gathers table and mask per entry).
__device__ __forceinline__ const float* reg_bias_base(const WindowAttentionParams& p, int64_t w, int h) {
  if (p.bias_buffer == nullptr) return nullptr;
  const int64_t type = p.mask != nullptr ? w % p.mask_windows : 0;
  return static_cast<const float*>(p.bias_buffer) + (type * p.heads + h) * window_attention_bias_block(p);
}

// The window's N x N bias block (table + mask of head h, window w's type) into shared memory
// (pitch kRegLdB), in two steps so its loads are in flight together with the tile loads: load()
// issues 16-byte loads of the bias buffer's block (16-byte aligned by construction), store()
// writes them out (or gathers table and mask per entry when there is no buffer). Entries outside
// N x N are left as they are: the kernels never use them.
struct RegBiasStage {
  static constexpr int kVecs = kRegTokens * kRegTokens / 4 / (kRegWarps * 32);  // per thread, at most
  const float* base;
  float4 v[kVecs];

  __device__ __forceinline__ void load(const WindowAttentionParams& p, int64_t w, int h) {
    base = reg_bias_base(p, w, h);
    const int nn = p.tokens * p.tokens;
#pragma unroll
    for (int q = 0; q < kVecs; ++q) {
      const int c = threadIdx.x + q * kRegWarps * 32;
      v[q] = (base != nullptr && 4 * c < nn) ? __ldg(reinterpret_cast<const float4*>(base) + c)
                                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
  }

  __device__ __forceinline__ void store(const WindowAttentionParams& p, int64_t w, int h, float* dst) const {
    const int N = p.tokens, nn = N * N;
    if (base != nullptr) {
#pragma unroll
      for (int q = 0; q < kVecs; ++q) {
        const float vals[4] = {v[q].x, v[q].y, v[q].z, v[q].w};
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int e = 4 * (threadIdx.x + q * kRegWarps * 32) + u;  // row-major in the N x N block
          if (e < nn) dst[(e / N) * kRegLdB + e % N] = vals[u];
        }
      }
    } else if (p.table != nullptr || p.mask != nullptr) {  // no buffer (too large): gather
      for (int e = threadIdx.x; e < nn; e += blockDim.x) dst[(e / N) * kRegLdB + e % N] = bias_at<float>(p, w, h, e / N, e % N);
    } else {
      for (int e = threadIdx.x; e < nn; e += blockDim.x) dst[(e / N) * kRegLdB + e % N] = 0.0f;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T, int D, bool kVec>
__global__ void __launch_bounds__(kRegWarps * 32, reg_fwd_blocks_per_sm<D>()) window_attention_fwd_reg_kernel(const WindowAttentionParams p) {
  VF_DYNAMIC_SMEM(smem_raw);
  SmemCarver sc{smem_raw};
  const RegSmem<T, D> sm = carve_reg<T, D>(sc, false);
  constexpr int ld = RegSmem<T, D>::ld;
  const int N = p.tokens;
  const int h = static_cast<int>(blockIdx.x % p.heads);
  const int64_t w = blockIdx.x / p.heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  RegBiasStage bias_stage;
  bias_stage.load(p, w, h);
  if constexpr (kVec) {
    const RegRole roles[3] = {{p.qkv, p.qkv_strides, p.q_off, p.head_stride, p.dim_k, sm.q},
                              {p.qkv, p.qkv_strides, p.k_off, p.head_stride, p.dim_k, sm.k},
                              {p.qkv, p.qkv_strides, p.v_off, p.head_stride, p.dim_v, sm.v}};
    load_roles_vec<T, D, 3>(p, w, h, roles);
  } else {
    zero_pad_columns<T, D>(sm.q, p.dim_k);
    zero_pad_columns<T, D>(sm.k, p.dim_k);
    zero_pad_columns<T, D>(sm.v, p.dim_v);
    load_qkv_tile<T, kVec>(p, w, h, 1, p.q_off, p.dim_k, 0, kRegTokens, sm.q, ld, 0);
    load_qkv_tile<T, kVec>(p, w, h, 1, p.k_off, p.dim_k, 0, kRegTokens, sm.k, ld, 0);
    load_qkv_tile<T, kVec>(p, w, h, 1, p.v_off, p.dim_v, 0, kRegTokens, sm.v, ld, 0);
  }
  bias_stage.store(p, w, h, sm.bias);
  __syncthreads();

  const int q0 = warp * 16;
  if (q0 >= N) return;  // no barrier follows
  const int keys16 = round16(N);

  // S = Q K^T: 16 rows x 64 keys, eight n8 tiles
  float s[8][4] = {};
#pragma unroll
  for (int k0 = 0; k0 < D; k0 += 16) {
    uint32_t a[4];
    mma::ldmatrix_x4(a, sm.q + (q0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
#pragma unroll
    for (int n0 = 0; n0 < kRegTokens; n0 += 16) {
      if (n0 >= keys16) continue;
      uint32_t b[4];
      mma::ldmatrix_x4(b, sm.k + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
      const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma::mma_16816<T>(s[n0 / 8], a, b0);
      mma::mma_16816<T>(s[n0 / 8 + 1], a, b1);
    }
  }

  // Bias (from shared memory), scale, softmax over the row: a row's 64 scores sit in the 4 lanes of
  // a quad (lanes 4g .. 4g+3), 16 each. Rows past N compute harmless values, never stored.
  const int rows[2] = {q0 + g, q0 + g + 8};
  const float scale = static_cast<float>(p.scale);
  float mx[2] = {wa::neg_inf<float>(), wa::neg_inf<float>()};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = rows[e >> 1], c = 8 * j + 2 * t + (e & 1);
      s[j][e] = c < N ? s[j][e] * scale + (i < N ? sm.bias[i * kRegLdB + c] : 0.0f) : wa::neg_inf<float>();
      mx[e >> 1] = max(mx[e >> 1], s[j][e]);
    }
  }
  float sum[2] = {0.0f, 0.0f};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
  }
  // A row whose every score is -inf (a fully masked row) keeps P = 0, l = 0, like the tile kernel.
  const float base[2] = {mx[0] == wa::neg_inf<float>() ? 0.0f : mx[0], mx[1] == wa::neg_inf<float>() ? 0.0f : mx[1]};
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = wa::acc_exp(s[j][e] - base[e >> 1]);
      sum[e >> 1] += s[j][e];
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
    sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
  }

  // O = P V: P's C tiles repacked as A fragments (16 keys per k step), V through ldmatrix.trans
  float o[D / 8][4] = {};
#pragma unroll
  for (int kk = 0; kk < kRegTokens / 16; ++kk) {
    if (kk * 16 >= keys16) continue;
    uint32_t a[4];
    c_tiles_to_a<T>(s[2 * kk], s[2 * kk + 1], a);
    mma_times_rows<T, D>(o, a, sm.v + kk * 16 * ld, ld, lane);
  }

  // Epilogue: out = O / l in the output's channel layout; lse = m + log(l).
  const Strides3& os = p.out_strides;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = rows[r];
    if (i >= N) continue;
    const float inv_l = 1.0f / sum[r];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][2 * r] *= inv_l;
      o[n][2 * r + 1] *= inv_l;
    }
    if (t == 0) static_cast<float*>(p.lse)[(w * p.heads + h) * N + i] = mx[r] + wa::acc_log(sum[r]);
  }
  store_rows<T, D, kVec>(o, 1.0f, q0, N, p.dim_v, [&](int i) {
    return static_cast<T*>(p.out) + token_offset(p.grid, os.img, os.y, os.x, w, i) + h * p.dim_v;
  });
}

template <typename T, int D>
int forward_reg(const WindowAttentionParams& p, cudaStream_t stream) {
  auto kernel = window_attention_fwd_reg_kernel<T, D, false>;
  if (vec_ok<T>(p, nullptr)) kernel = window_attention_fwd_reg_kernel<T, D, true>;
  const size_t smem = reg_smem<T, D>(false);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  VF_LAUNCH(kernel, static_cast<unsigned>(p.windows * p.heads), kRegWarps * 32, smem, stream, p);
  return static_cast<int>(cudaGetLastError());
}

// ---------------------------------------------------------------------------------------------
// Backward

template <typename T, int D, bool kVec>
__global__ void __launch_bounds__(kRegWarps * 32, reg_bwd_blocks_per_sm<D>())
    window_attention_bwd_reg_kernel(const WindowAttentionBackwardParams b, int64_t slots, float* dbias_slots) {
  VF_DYNAMIC_SMEM(smem_raw);
  SmemCarver sc{smem_raw};
  const RegSmem<T, D> sm = carve_reg<T, D>(sc, true);
  constexpr int ld = RegSmem<T, D>::ld;
  const WindowAttentionParams& p = b.fwd;
  const int N = p.tokens;
  const int h = static_cast<int>(blockIdx.x % p.heads);
  const int64_t slot = blockIdx.x / p.heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const float scale = static_cast<float>(p.scale);
  const Strides3& gs = b.grad_qkv_strides;
  const int j0 = warp * 16;  // this warp's keys
  const bool keys_active = j0 < N;
  const int keys16 = round16(N);

  if constexpr (!kVec) {  // the vector loads write whole D-wide rows (zeros beyond dim)
    zero_pad_columns<T, D>(sm.q, p.dim_k);
    zero_pad_columns<T, D>(sm.k, p.dim_k);
    zero_pad_columns<T, D>(sm.v, p.dim_v);
    zero_pad_columns<T, D>(sm.dout, p.dim_v);
    zero_pad_columns<T, D>(sm.o, p.dim_v);
  }
  // dS^T entries no warp writes (keys of idle warps, query tiles past N) stay zero
  for (int e = threadIdx.x; e < kRegTokens * kRegLdS; e += blockDim.x) sm.dst[e] = wa::zero<T>();
  // The bias gradient of the block's head, summed over its windows: each entry belongs to one lane
  // (its C-fragment position), so the lanes add without synchronising; shared memory rather than
  // registers keeps the kernel's registers for the products.
  for (int e = threadIdx.x; e < kRegTokens * kRegLdB; e += blockDim.x) sm.dbias[e] = 0.0f;

  for (int64_t w = slot; w < p.windows; w += slots) {
    __syncthreads();  // previous window fully consumed (and the zero fills done)
    // The window's bias block and log-sum-exp go to shared memory with the tile loads, so their
    // global (L2) latency is paid once per window, overlapped with the tiles', instead of once per
    // query tile inside the product loop.
    RegBiasStage bias_stage;
    bias_stage.load(p, w, h);
    const float lse_v = threadIdx.x < N ? static_cast<const float*>(p.lse)[(w * p.heads + h) * N + threadIdx.x] : 0.0f;
    if constexpr (kVec) {
      const RegRole roles[5] = {{p.qkv, p.qkv_strides, p.q_off, p.head_stride, p.dim_k, sm.q},
                                {p.qkv, p.qkv_strides, p.k_off, p.head_stride, p.dim_k, sm.k},
                                {p.qkv, p.qkv_strides, p.v_off, p.head_stride, p.dim_v, sm.v},
                                {b.grad_out, p.out_strides, 0, p.dim_v, p.dim_v, sm.dout},
                                {p.out, p.out_strides, 0, p.dim_v, p.dim_v, sm.o}};
      load_roles_vec<T, D, 5>(p, w, h, roles);
    } else {
      load_qkv_tile<T, kVec>(p, w, h, 1, p.q_off, p.dim_k, 0, kRegTokens, sm.q, ld, 0);
      load_qkv_tile<T, kVec>(p, w, h, 1, p.k_off, p.dim_k, 0, kRegTokens, sm.k, ld, 0);
      load_qkv_tile<T, kVec>(p, w, h, 1, p.v_off, p.dim_v, 0, kRegTokens, sm.v, ld, 0);
      load_tile<T, kVec>(p, b.grad_out, p.out_strides, w, h, 1, 0, p.dim_v, p.dim_v, 0, kRegTokens, sm.dout, ld, 0);
      load_tile<T, kVec>(p, p.out, p.out_strides, w, h, 1, 0, p.dim_v, p.dim_v, 0, kRegTokens, sm.o, ld, 0);
    }
    bias_stage.store(p, w, h, sm.bias);
    if (threadIdx.x < kRegTokens) sm.lse[threadIdx.x] = lse_v;
    __syncthreads();
    {  // D = rowsum(dO * O), the softmax backward's row term: two threads per row (128 = 64 x 2)
      const int r = threadIdx.x >> 1, half = threadIdx.x & 1;
      const int c_end = min(p.dim_v, (half + 1) * ((p.dim_v + 1) / 2));
      float acc = 0.0f;
      for (int c = half * ((p.dim_v + 1) / 2); c < c_end; ++c)
        acc += wa::to_acc(sm.o[r * ld + c]) * wa::to_acc(sm.dout[r * ld + c]);
      acc += __shfl_xor_sync(0xffffffffu, acc, 1);
      if (half == 0) sm.dd[r] = acc;
    }
    __syncthreads();

    if (keys_active) {
      uint32_t ka[D / 16][4], va[D / 16][4];  // K and V rows of this warp as A fragments
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc) {
        mma::ldmatrix_x4(ka[kc], sm.k + (j0 + (lane & 15)) * ld + kc * 16 + (lane >> 4) * 8);
        mma::ldmatrix_x4(va[kc], sm.v + (j0 + (lane & 15)) * ld + kc * 16 + (lane >> 4) * 8);
      }
      float dk[D / 8][4] = {}, dv[D / 8][4] = {};
#pragma unroll 1
      for (int I = 0; I * 16 < keys16; ++I) {
        // S^T = K Q^T and dP^T = V dO^T for queries 16I .. 16I+15
        float st[2][4] = {}, dpt[2][4] = {};
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
          const int off = (I * 16 + (lane & 7) + (lane >> 4) * 8) * ld + kc * 16 + ((lane >> 3) & 1) * 8;
          uint32_t bq[4], bo[4];
          mma::ldmatrix_x4(bq, sm.q + off);
          mma::ldmatrix_x4(bo, sm.dout + off);
          const uint32_t q0[2] = {bq[0], bq[1]}, q1[2] = {bq[2], bq[3]};
          const uint32_t o0[2] = {bo[0], bo[1]}, o1[2] = {bo[2], bo[3]};
          mma::mma_16816<T>(st[0], ka[kc], q0);
          mma::mma_16816<T>(st[1], ka[kc], q1);
          mma::mma_16816<T>(dpt[0], va[kc], o0);
          mma::mma_16816<T>(dpt[1], va[kc], o1);
        }
        // lane's entries: key j0 + g (+8 for e >= 2), query 16I + 8n + 2t (+1 for odd e)
        float bias[2][4], lse_v[2][2], dd_v[2][2];
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int i = I * 16 + 8 * n + 2 * t + c;
            lse_v[n][c] = sm.lse[i];
            dd_v[n][c] = sm.dd[i];
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = I * 16 + 8 * n + 2 * t + (e & 1), j = j0 + g + 8 * (e >> 1);
            bias[n][e] = sm.bias[i * kRegLdB + j];  // used only inside the window's N x N
          }
        }
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = I * 16 + 8 * n + 2 * t + (e & 1), j = j0 + g + 8 * (e >> 1);
            float pv = 0.0f, ds = 0.0f;
            if (i < N && j < N) {
              pv = wa::acc_exp(st[n][e] * scale + bias[n][e] - lse_v[n][e & 1]);
              ds = pv * (dpt[n][e] - dd_v[n][e & 1]);
            }
            st[n][e] = pv;
            dpt[n][e] = ds;
            if (dbias_slots != nullptr) sm.dbias[j * kRegLdB + i] += ds;
          }
        }
        // dV += P^T dO, dK += dS^T Q (the score scale is applied at the end)
        uint32_t pa[4], da[4];
        c_tiles_to_a<T>(st[0], st[1], pa);
        c_tiles_to_a<T>(dpt[0], dpt[1], da);
        mma_times_rows<T, D>(dv, pa, sm.dout + I * 16 * ld, ld, lane);
        mma_times_rows<T, D>(dk, da, sm.q + I * 16 * ld, ld, lane);
        // dS^T (keys x queries) for the dQ product after the barrier
        T* d0 = sm.dst + (j0 + g) * kRegLdS + I * 16 + 2 * t;
        T* d1 = d0 + 8 * kRegLdS;
        *reinterpret_cast<uint32_t*>(d0) = da[0];
        *reinterpret_cast<uint32_t*>(d1) = da[1];
        *reinterpret_cast<uint32_t*>(d0 + 8) = da[2];
        *reinterpret_cast<uint32_t*>(d1 + 8) = da[3];
      }
      store_rows<T, D, kVec>(dk, scale, j0, N, p.dim_k, [&](int j) {
        return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + p.k_off +
               h * p.head_stride;
      });
      store_rows<T, D, kVec>(dv, 1.0f, j0, N, p.dim_v, [&](int j) {
        return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, j) + p.v_off +
               h * p.head_stride;
      });
    }
    __syncthreads();  // dS^T complete

    // dQ of query rows 16 warp .. = dS K over every key (A: dS^T through ldmatrix.trans)
    const int i0 = warp * 16;
    if (i0 < N) {
      float dq[D / 8][4] = {};
#pragma unroll
      for (int kk = 0; kk < kRegTokens / 16; ++kk) {
        if (kk * 16 >= keys16) continue;
        uint32_t a[4];
        mma::ldmatrix_x4_trans(a, sm.dst + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * kRegLdS + i0 +
                                      ((lane >> 3) & 1) * 8);
        mma_times_rows<T, D>(dq, a, sm.k + kk * 16 * ld, ld, lane);
      }
      store_rows<T, D, kVec>(dq, scale, i0, N, p.dim_k, [&](int i) {
        return static_cast<T*>(b.grad_qkv) + token_offset(p.grid, gs.img, gs.y, gs.x, w, i) + p.q_off +
               h * p.head_stride;
      });
    }
  }

  if (dbias_slots != nullptr) {
    __syncthreads();
    float* out = dbias_slots + (slot * p.heads + h) * static_cast<int64_t>(N) * N;
    for (int e = threadIdx.x; e < N * N; e += blockDim.x) {
      const int i = e / N, j = e - i * N;
      out[e] = sm.dbias[j * kRegLdB + i];
    }
  }
}

template <typename T, int D>
auto bwd_reg_kernel_for(const WindowAttentionBackwardParams& b) {
  return vec_ok<T>(b.fwd, b.grad_out) ? window_attention_bwd_reg_kernel<T, D, true>
                                      : window_attention_bwd_reg_kernel<T, D, false>;
}

// Window slots when a bias gradient is wanted: one wave of (slot, head) blocks, as many as the GPU
// holds at once (the occupancy API's answer for this kernel), each looping over windows / slots
// windows with its head's bias gradient in shared memory; no tail wave, and as few slot partials
// as keep every SM busy. Without a bias gradient every window is its own block.
template <typename T, int D>
int64_t reg_bwd_slots(const WindowAttentionBackwardParams& b) {
  const WindowAttentionParams& p = b.fwd;
  if (b.dbias == nullptr) return p.windows;
  const int per_sm = resident_blocks_per_sm(bwd_reg_kernel_for<T, D>(b), kRegWarps * 32, reg_smem<T, D>(true),
                                            reg_bwd_blocks_per_sm<D>());
  const int64_t resident = static_cast<int64_t>(per_sm) * device_sms();
  return std::max<int64_t>(1, std::min<int64_t>(p.windows, resident / p.heads));
}

template <typename T>
int64_t reg_bwd_slots_for(const WindowAttentionBackwardParams& b) {
  return reg_head_dim(b.fwd) == 32 ? reg_bwd_slots<T, 32>(b) : reg_bwd_slots<T, 64>(b);
}

template <typename T, int D>
int backward_reg(const WindowAttentionBackwardParams& b, float* slots_buf, int64_t slots, cudaStream_t stream) {
  const WindowAttentionParams& p = b.fwd;
  auto kernel = bwd_reg_kernel_for<T, D>(b);
  const size_t smem = reg_smem<T, D>(true);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  VF_LAUNCH(kernel, static_cast<unsigned>(slots * p.heads), kRegWarps * 32, smem, stream, b, slots, slots_buf);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace vitfast
