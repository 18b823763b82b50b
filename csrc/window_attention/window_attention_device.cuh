// Device-side pieces every window-attention kernel shares (plain and head-mixing): element and
// bias access, tile loads into shared memory, block -> work mapping, device queries, the bias
// buffer and the in-order slot reduction. Included by window_attention_cuda.cu only.
#pragma once

#include <algorithm>
#include <cstdio>

#include "../common/cuda_compat.cuh"
#include "../common/cuda_dtype.cuh"
#include "window_attention.h"
#include "window_attention_tiles.cuh"

namespace vitfast {
namespace {  // one translation unit: window_attention_cuda.cu (or the CUDA emulator binding)

using wa::round16;
using wa::SmemCarver;

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
  return static_cast<const Acc*>(p.bias_buffer) + (type * p.heads + h) * window_attention_bias_block(p) +
         static_cast<int64_t>(i) * p.tokens;
}

template <typename Acc>
__device__ __forceinline__ Acc bias_of(const WindowAttentionParams& p, const Acc* row, int64_t w, int h, int i, int j) {
  return row != nullptr ? row[j] : bias_at<Acc>(p, w, h, i, j);
}

// Fills the bias buffer: table[h, index[i, j]] + mask[type, i, j].
template <typename Acc>
__global__ void window_attention_bias_kernel(const WindowAttentionParams p) {
  const int64_t nn = static_cast<int64_t>(p.tokens) * p.tokens, bb = window_attention_bias_block(p);
  const int64_t total = window_attention_bias_elements(p);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ij = e % bb, th = e / bb;
    const int h = static_cast<int>(th % p.heads);
    const int64_t type = th / p.heads;  // a window index whose mask type is `type`
    static_cast<Acc*>(p.bias_buffer)[e] =
        ij < nn ? bias_at<Acc>(p, type, h, static_cast<int>(ij / p.tokens), static_cast<int>(ij % p.tokens)) : Acc(0);
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


int device_sms() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms > 0 ? sms : 1;
}

// Blocks of `kernel` (threads, dynamic shared memory smem) the occupancy API says an SM holds at
// once; `fallback` when the query fails.
template <typename K>
int resident_blocks_per_sm(K kernel, int threads, size_t smem, int fallback) {
  int per_sm = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess || per_sm < 1) {
    return fallback;
  }
  return per_sm;
}

size_t device_smem_optin() {
  int dev = 0, bytes = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return static_cast<size_t>(bytes);
}

// Most (heads x key tiles) per block that fits; all heads first, keys of one window in one block
// when possible (then dQ needs no partials). Slots: enough blocks to fill the GPU when a bias

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

// out[e] = sum over slots s of slots[s * per_slot + e], in slot order (deterministic).
template <typename Acc>
__global__ void window_attention_slot_reduce_kernel(const Acc* slots, int64_t nslots, int64_t per_slot, Acc* dbias) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < per_slot;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc sum = 0;
    for (int64_t s = 0; s < nslots; ++s) sum += slots[s * per_slot + e];
    dbias[e] = sum;
  }
}
}  // namespace
}  // namespace vitfast
