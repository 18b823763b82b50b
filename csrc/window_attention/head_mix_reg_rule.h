// Which head-mixing shapes the register kernels (head_mix_reg.cuh) take, and their shared-memory
// layout. Host-side and torch-free: the entry points (head_mix_cuda.cu) ask the rule without
// compiling the kernels, and the kernels carve shared memory from the same layout.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "../common/cuda_compat.cuh"
#include "window_attention.h"

namespace vitfast {

constexpr int kMixRegTokens = 64;             // 4 warps x 16 rows (queries in the forward, keys in the backward)
constexpr int kMixRegWarps = 4;
constexpr int kMixRegD = 32;                  // padded head dim (Swin's and Mini-Swin's heads are 32 wide)
constexpr int kMixRegLd = kMixRegD + 8;       // q/k/v/dO tile pitch (+8: ldmatrix without bank conflicts)
constexpr int kMixRegLdS = kMixRegTokens + 8;  // dS^T tile pitch

// Byte offsets into the dynamic shared memory. Forward: q, k, v of every head and the window
// type's mixed bias (kH x N x N floats, row pitch N). Backward: the per-window inputs -- q, k, v,
// dO of every head, the window's mask (N x N), the mixed scores' lse (kH x 64) -- then the table
// bias (kH x N x N), dS^T of every head, D per head, the table gradient summed over the block's
// windows and the mixing parameters (used with 4 heads). D's per-warp partials (and at the end the
// mixing gradients' per-warp sums) share dS^T's space: every dS^T entry dQ reads is rewritten by
// the gradient pass of each window, after D is formed. Pipelined: a second copy of the per-window
// inputs `window_stride` bytes after the first, which cp.async fills with the next window while
// the block computes on the current one.
struct MixRegLayout {
  size_t q = 0, k = 0, v = 0, dout = 0, mask = 0, lse = 0;  // per-window inputs (first copy)
  size_t window_stride = 0;                                  // pipelined: second copy at + window_stride
  size_t bias = 0, dst = 0, dd = 0, dpart = 0, dtable = 0, weights = 0;
  size_t total = 0;
};

// Byte offsets of consecutive pieces of one dynamic shared-memory block, each 128-byte aligned.
VF_HD constexpr size_t align128(size_t bytes) { return (bytes + 127) & ~static_cast<size_t>(127); }
struct SmemOffsets {
  size_t end = 0;
  VF_HD size_t take(size_t bytes) {
    const size_t at = align128(end);
    end = at + bytes;
    return at;
  }
};

VF_HD MixRegLayout mix_reg_layout(int heads, int tokens, bool backward, bool pipelined = false) {
  MixRegLayout L;
  SmemOffsets so;
  auto take = [&](size_t bytes) { return so.take(bytes); };
  const size_t tile = static_cast<size_t>(heads) * kMixRegTokens * kMixRegLd * 2;  // 16-bit elements
  const size_t nn = static_cast<size_t>(tokens) * tokens;
  auto window_inputs = [&] {
    const size_t first = take(tile);
    take(tile);
    take(tile);
    if (backward) {
      take(tile);
      take(nn * sizeof(float));
      take(static_cast<size_t>(heads) * kMixRegTokens * sizeof(float));
    }
    return first;
  };
  // offsets inside one copy (every take is 128-byte aligned, so both copies share them)
  L.q = window_inputs();
  L.k = L.q + align128(tile);
  L.v = L.k + align128(tile);
  if (backward) {
    L.dout = L.v + align128(tile);
    L.mask = L.dout + align128(tile);
    L.lse = L.mask + align128(nn * sizeof(float));
    if (pipelined) L.window_stride = window_inputs() - L.q;
  }
  L.bias = take(heads * nn * sizeof(float));
  if (backward) {
    L.dst = take(static_cast<size_t>(heads) * kMixRegTokens * kMixRegLdS * 2);
    L.dpart = L.dst;  // 4 x heads x 64 floats <= heads x 64 x 72 16-bit elements
    L.dd = take(static_cast<size_t>(heads) * kMixRegTokens * sizeof(float));
    L.dtable = take(heads * nn * sizeof(float));
    L.weights = take((2 * heads * heads + heads) * sizeof(float));  // 4 heads: the mixing parameters
  }
  L.total = so.end;
  return L;
}

// Floats of one window type's mixed-bias block (sum_h pre[g, h] table_h + mask), padded to 4 so
// every block starts 16-byte aligned.
VF_HD int64_t mix_reg_bias_block(int heads, int tokens) {
  return (static_cast<int64_t>(heads) * tokens * tokens + 3) / 4 * 4;
}

// VITFAST_WINDOW_ATTENTION_ROUTE=tiles forces the shared-memory-tile kernels (of both ops).
inline bool mix_reg_route_disabled() {
  const char* v = std::getenv("VITFAST_WINDOW_ATTENTION_ROUTE");
  return v != nullptr && std::strcmp(v, "tiles") == 0;
}

// The backward double-buffers its per-window inputs with cp.async (head_mix_reg.cuh) when the
// rows allow 16-byte copies (`vec_rows`), the mask is float32 or absent, there are 3 heads (4 leave
// no room) and both buffers fit; VITFAST_HEAD_MIX_PIPELINE=0 turns it off (to measure it).
inline bool mix_reg_pipelined(const WindowAttentionParams& p, bool vec_rows) {
  const char* v = std::getenv("VITFAST_HEAD_MIX_PIPELINE");
  if ((v != nullptr && std::strcmp(v, "0") == 0) || !vec_rows || p.heads != 3) return false;
  if (p.mask != nullptr && p.mask_dtype != DType::kFloat32) return false;
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return mix_reg_layout(p.heads, p.tokens, true, true).total <= static_cast<size_t>(optin);
}

// fp16/bf16 on sm_80+, windows of <= 64 tokens, head dims <= 32, 3 or 4 heads (the first stage of
// Mini-Swin-T/S and -B), when both kernels' shared memory fits the device.
inline bool mix_reg_route_ok(const WindowAttentionParams& p) {
  if ((p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) || mix_reg_route_disabled()) return false;
  if (p.tokens > kMixRegTokens || p.dim_k > kMixRegD || p.dim_v > kMixRegD || (p.heads != 3 && p.heads != 4))
    return false;
  int dev = 0, major = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return major >= 8 && mix_reg_layout(p.heads, p.tokens, true).total <= static_cast<size_t>(optin) &&
         mix_reg_layout(p.heads, p.tokens, false).total <= static_cast<size_t>(optin);
}

}  // namespace vitfast
