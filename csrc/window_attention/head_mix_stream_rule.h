// Which head-mixing shapes the streaming forward kernel (head_mix_stream.cuh) takes, and its
// shared-memory layout. Host-side and torch-free, like head_mix_reg_rule.h: the entry points ask
// the rule without compiling the kernel, and the kernel carves shared memory from the same layout.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common/cuda_compat.cuh"
#include "head_mix_reg_rule.h"
#include "window_attention.h"

namespace vitfast {

constexpr int kMixStreamWarps = 4;
constexpr int kMixStreamRows = kMixStreamWarps * 16;  // query rows per block (16 per warp)
constexpr int kMixStreamKeys = 16;                     // keys per streamed tile
// The mixed bias (table + mask, pre-mixed: types x heads x N x N floats) is a per-call workspace;
// past this many floats (64 MiB; Mini-Swin's 7 x 7 windows at 12 heads need ~0.5 MB, 12 x 12
// windows ~4 MB) the tile kernels, which gather the table per score, run instead.
constexpr int64_t kMixStreamMaxBias = int64_t(1) << 24;

// Output heads per pass-2 group: a warp keeps O (D / 2 registers per head) and P' (8 per head) of
// its group beside every head's score tile (8 x heads; the rows' lse and the mixing weights are
// read from shared memory), so wide or many heads take smaller groups (each group recomputes the
// scores; head_mix_stream.cuh). Sizes chosen by ptxas: the largest without more than ~130 B of
// spills (benchmarks/NOTES.md).
VF_HD constexpr int mix_stream_group(int heads, int D) {
  const int most = D == 64 ? (heads == 3 || heads == 6 ? 3 : 2) : (heads >= 12 ? 3 : 4);
  const int groups = (heads + most - 1) / most;
  return (heads + groups - 1) / groups;
}

// Padded head dim of the streaming kernel: 32 or 64.
VF_HD constexpr int mix_stream_dim(int dim_k, int dim_v) { return (dim_k > dim_v ? dim_k : dim_v) <= 32 ? 32 : 64; }

// Byte offsets into the dynamic shared memory: q of the block's 64 query rows of every head, two
// buffers of one key tile of every head, two buffers of one value tile of a group's heads, the
// mixing parameters [pre * scale | post | post_bias] and the rows' lse ([row][head]), floats.
struct MixStreamLayout {
  size_t q = 0, k = 0, v = 0, weights = 0, lse = 0, total = 0;
  size_t k_buffer = 0, v_buffer = 0;  // bytes between the two buffers
};

VF_HD MixStreamLayout mix_stream_layout(int heads, int D) {
  MixStreamLayout L;
  SmemOffsets so;
  const size_t row = (static_cast<size_t>(D) + 8) * 2;  // one 16-bit row, pitch D + 8
  L.q = so.take(static_cast<size_t>(heads) * kMixStreamRows * row);
  L.k_buffer = align128(static_cast<size_t>(heads) * kMixStreamKeys * row);
  L.k = so.take(2 * L.k_buffer);
  L.v_buffer = align128(static_cast<size_t>(mix_stream_group(heads, D)) * kMixStreamKeys * row);
  L.v = so.take(2 * L.v_buffer);
  L.weights = so.take(static_cast<size_t>(2 * heads * heads + heads) * sizeof(float));
  L.lse = so.take(static_cast<size_t>(kMixStreamRows) * heads * sizeof(float));
  L.total = so.end;
  return L;
}

// The head counts the kernel is compiled for (DeiT-Ti/S/B: 3/6/12, CaiT-XXS/XS/S: 4/6/8, Mini-Swin-T/S
// stages 2-3: 6/12, Mini-Swin-B stage 2: 8). 16 and more heads (CaiT-M, Mini-Swin-B stage 3, the
// last stages) spill: the score tiles of every head alone take 8 x heads registers; 16 and 24 of
// them run the head-split forward instead (mix_split_fwd_shape below).
inline bool mix_stream_heads_ok(int heads) {
  return heads == 3 || heads == 4 || heads == 6 || heads == 8 || heads == 12;
}

// Mixed-bias workspace of the forward (floats): one (heads x N x N) block per window type when
// there is a table or a mask, else none.
inline int64_t mix_stream_bias_floats(const WindowAttentionParams& p) {
  if (p.table == nullptr && p.mask == nullptr) return 0;
  return (p.mask != nullptr ? p.mask_windows : 1) * mix_reg_bias_block(p.heads, p.tokens);
}

// ---------------------------------------------------------------------------------------------
// Streaming backward (head_mix_stream_bwd.cuh): a query-major kernel (D, dQ, mixing gradients)
// and a key-major kernel (dK, dV), both with 64 rows of every head resident per block and 16-row
// tiles of every head streamed. Each keeps its products of every head in registers (S and dP',
// 8 x heads each), so its accumulators go per group of heads, the scores recomputed per group.

// The shapes the streaming backward takes: 3, 4, 6, 8 or 12 heads of <= 64 channels and 16 of <=
// 32. Its own kernels hold 12 heads of <= 32 only (Mini-Swin-T/S stage 3): at 12 heads of 64
// (DeiT-B) 64 rows of q and dO alone take 221 KB of shared memory; those and 16 heads go to the
// head-split kernels below.
VF_HD constexpr bool mix_split_bwd_shape(int heads, int D);
VF_HD constexpr bool mix_stream_bwd_shape_ok(int heads, int D) {
  return heads == 3 || heads == 4 || heads == 6 || heads == 8 || heads == 12 || mix_split_bwd_shape(heads, D);
}

// 12 heads of 48-64 channels (DeiT-B) and 16 of <= 32 (Mini-Swin-B stage 3) take the head-split
// kernels of head_mix_split_bwd.cuh instead (16 of 64 and 24 heads do not fit their shared memory): 16 rows of every head per block, 8 warps, each warp forming one
// product (scores or dP') of a quarter of the heads, the products exchanged through shared memory
// and mixed once per entry, so that no warp holds every head's products.
VF_HD constexpr bool mix_split_bwd_shape(int heads, int D) { return (heads == 12 && D == 64) || (heads == 16 && D == 32); }

constexpr int kMixSplitWarps = 8;
constexpr int kMixSplitRows = 16;                         // query rows (key rows) per block
constexpr int kMixSplitXPitch = kMixSplitRows * 16 + 1;  // floats per head in the exchange (odd: heads on other banks)
constexpr int kMixSplitYLd = 24;                          // 16-bit pitch of the exchanged 16 x 16 tiles (ldmatrix rows)

// Byte offsets of the head-split kernels: resident rows of two roles (16 per head), two buffers of
// a 16-row tile of every head for each streamed role, the float exchange (query-major: raw scores
// -> S, dP', P, dS' of every head; key-major: raw scores and dP'), the 16-bit exchange (query-major:
// dA; key-major: P' and dA), the weights [pre * scale | (pre * scale)^T | post | post^T |
// post_bias] and the row statistics (query-major: lse and D of its 16 rows; key-major: two buffers
// of the tile's lse and D).
struct MixSplitBwdLayout {
  size_t rows_a = 0, rows_b = 0, tile_a = 0, tile_b = 0, xch = 0, half = 0, weights = 0, stats = 0, total = 0;
  size_t tile_buffer = 0;
};

VF_HD MixSplitBwdLayout mix_split_bwd_layout(int heads, int D, bool key_major) {
  MixSplitBwdLayout L;
  SmemOffsets so;
  const size_t row = (static_cast<size_t>(D) + 8) * 2;
  const size_t rows = static_cast<size_t>(heads) * kMixSplitRows * row;
  L.rows_a = so.take(rows);
  L.rows_b = so.take(rows);
  L.tile_buffer = align128(static_cast<size_t>(heads) * kMixStreamKeys * row);
  L.tile_a = so.take(2 * L.tile_buffer);
  L.tile_b = so.take(2 * L.tile_buffer);
  L.xch = so.take(static_cast<size_t>(key_major ? 2 : 4) * heads * kMixSplitXPitch * sizeof(float));
  L.half = so.take(static_cast<size_t>(key_major ? 2 : 1) * heads * kMixSplitRows * kMixSplitYLd * 2);
  L.weights = so.take(static_cast<size_t>(4 * heads * heads + heads) * sizeof(float));
  L.stats = so.take(static_cast<size_t>(key_major ? 4 : 2) * kMixSplitRows * heads * sizeof(float));
  L.total = so.end;
  return L;
}

// Past 8 heads, both products of every head for a 16 x 16 tile (8 x heads registers each) leave no
// room: the kernels form them one 8-key (8-query) half of a tile at a time (4 x heads each), and the
// query-major kernel's mixing-gradient partials (2 heads^2 + heads, which pass D and pass dpre hold
// at once below 12 heads) go in passes over groups of mix_stream_bwd_mix_group heads.
VF_HD constexpr bool mix_stream_bwd_halves(int heads) { return heads > 8; }
VF_HD constexpr int mix_stream_bwd_mix_group(int heads) { return heads > 8 ? 2 : heads; }

// Heads per dQ group (dQ: D / 2 registers per head) and per dV and dK group of the key-major
// kernel (one accumulator of D / 2 registers per head; the dV passes hold the scores of every head
// only, the dK passes both products). Chosen by ptxas like the forward's (benchmarks/NOTES.md).
VF_HD constexpr int mix_stream_bwd_q_group(int heads, int D) {
  return D == 64 ? (heads == 3 ? 3 : heads == 8 ? 1 : 2)
                 : (heads == 6 || heads == 12 ? 3 : heads == 8 ? 2 : heads);
}
VF_HD constexpr int mix_stream_bwd_v_group(int heads, int D) {
  return D == 64 ? (heads == 4 ? 2 : 3) : (heads == 8 || heads == 12 ? 4 : heads);
}
VF_HD constexpr int mix_stream_bwd_k_group(int heads, int D) {
  return D == 64 ? (heads == 3 ? 3 : 2) : (heads == 6 || heads == 12 ? 3 : heads == 8 ? 2 : heads);
}

// Byte offsets: the block's resident rows of two roles (q and dO in the query-major kernel, k and v
// in the key-major one), two buffers of a 16-row tile of every head for each of the two streamed
// roles, the mixing parameters, and 128 x heads floats of row statistics (query-major: lse and D
// of its 64 rows; key-major: two buffers of the tile's lse and D).
struct MixStreamBwdLayout {
  size_t rows_a = 0, rows_b = 0, tile_a = 0, tile_b = 0, weights = 0, stats = 0, total = 0;
  size_t tile_buffer = 0;  // bytes between a role's two tile buffers
};

VF_HD MixStreamBwdLayout mix_stream_bwd_layout(int heads, int D) {
  MixStreamBwdLayout L;
  SmemOffsets so;
  const size_t row = (static_cast<size_t>(D) + 8) * 2;
  L.rows_a = so.take(static_cast<size_t>(heads) * kMixStreamRows * row);
  L.rows_b = so.take(static_cast<size_t>(heads) * kMixStreamRows * row);
  L.tile_buffer = align128(static_cast<size_t>(heads) * kMixStreamKeys * row);
  L.tile_a = so.take(2 * L.tile_buffer);
  L.tile_b = so.take(2 * L.tile_buffer);
  L.weights = so.take(static_cast<size_t>(2 * heads * heads + heads) * sizeof(float));
  L.stats = so.take(static_cast<size_t>(2 * kMixStreamRows) * heads * sizeof(float));
  L.total = so.end;
  return L;
}

// The head-split forward (head_mix_split_fwd.cuh): 16 heads of <= 64 channels (CaiT-M, Mini-Swin-B
// stage 3) and 24 of <= 32 (Mini-Swin-T/S stage 4), which the streaming forward does not hold; 12
// heads of 48-64 (DeiT-B) with VITFAST_HEAD_MIX_SPLIT_FWD=1, to measure it against the streaming
// forward in one process.
VF_HD constexpr bool mix_split_fwd_shape(int heads, int D) { return heads == 16 || (heads == 24 && D == 32); }
inline bool mix_split_fwd_forced() {
  const char* v = std::getenv("VITFAST_HEAD_MIX_SPLIT_FWD");
  return v != nullptr && std::strcmp(v, "1") == 0;
}
inline bool mix_split_fwd_runs(int heads, int D) {
  return mix_split_fwd_shape(heads, D) || (heads == 12 && D == 64 && mix_split_fwd_forced());
}

// Byte offsets of the head-split forward: q of the block's 16 rows of every head, two buffers of a
// key tile and of a value tile of every head, the float exchange (raw scores), the 16-bit
// exchange (P'), the weights (as the backward's) and the rows' lse ([row][head]).
struct MixSplitFwdLayout {
  size_t q = 0, k = 0, v = 0, xch = 0, half = 0, weights = 0, lse = 0, total = 0;
  size_t tile_buffer = 0;
};

VF_HD MixSplitFwdLayout mix_split_fwd_layout(int heads, int D) {
  MixSplitFwdLayout L;
  SmemOffsets so;
  const size_t row = (static_cast<size_t>(D) + 8) * 2;
  L.q = so.take(static_cast<size_t>(heads) * kMixSplitRows * row);
  L.tile_buffer = align128(static_cast<size_t>(heads) * kMixStreamKeys * row);
  L.k = so.take(2 * L.tile_buffer);
  L.v = so.take(2 * L.tile_buffer);
  L.xch = so.take(static_cast<size_t>(heads) * kMixSplitXPitch * sizeof(float));
  L.half = so.take(static_cast<size_t>(heads) * kMixSplitRows * kMixSplitYLd * 2);
  L.weights = so.take(static_cast<size_t>(4 * heads * heads + heads) * sizeof(float));
  L.lse = so.take(static_cast<size_t>(kMixSplitRows) * heads * sizeof(float));
  L.total = so.end;
  return L;
}

// fp16/bf16 on sm_80+, head dims <= 64, the head counts above (streaming forward) or the head-split
// forward's, shapes the register kernels (head_mix_reg.cuh) do not take, when shared memory and the
// mixed bias fit. The backward: mix_stream_bwd_route_ok below, else the tile kernels, which read the
// same log-sum-exp.
inline bool mix_stream_route_ok(const WindowAttentionParams& p) {
  if ((p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) || mix_reg_route_disabled()) return false;
  if (p.dim_k > 64 || p.dim_v > 64 || mix_reg_route_ok(p)) return false;
  const int D = mix_stream_dim(p.dim_k, p.dim_v);
  if (!mix_stream_heads_ok(p.heads) && !mix_split_fwd_shape(p.heads, D)) return false;
  if (mix_stream_bias_floats(p) > kMixStreamMaxBias) return false;
  int dev = 0, major = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  const size_t need = mix_split_fwd_runs(p.heads, D) ? mix_split_fwd_layout(p.heads, D).total
                                                     : mix_stream_layout(p.heads, D).total;
  return major >= 8 && need <= static_cast<size_t>(optin);
}

// VITFAST_HEAD_MIX_STREAM_BWD=0 keeps the tile backward behind the streaming forward (to measure
// one against the other in one process).
inline bool mix_stream_bwd_disabled() {
  const char* v = std::getenv("VITFAST_HEAD_MIX_STREAM_BWD");
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// Table-gradient sums of the streaming backward: one heads x N x N block per resident block (at
// most two per SM: 128 threads of ~255 registers). Past this many floats (128 MiB; Mini-Swin's 7 x 7
// windows at 8 heads on 132 SMs: 5 M) the tile backward runs instead.
constexpr int64_t kMixStreamMaxTableSums = int64_t(1) << 25;

// The streaming backward takes every shape of the streaming forward (DeiT-Ti/S/B, CaiT-XXS/XS/S,
// Mini-Swin-T/S stages 2-3, Mini-Swin-B stage 2), with or without a table and a mask, when its
// shared memory fits (6 heads of 64: 169 KB; 8 heads of 64: 221 KB; 12 of 32: 192 KB; the
// head-split kernels at 12 heads of 64: 223 KB: an H100 but not an A100) and, with a table, its
// per-block table-gradient sums.
inline bool mix_stream_bwd_route_ok(const WindowAttentionParams& p) {
  if (!mix_stream_route_ok(p) || mix_stream_bwd_disabled()) return false;
  if (!mix_stream_bwd_shape_ok(p.heads, mix_stream_dim(p.dim_k, p.dim_v))) return false;
  int dev = 0, optin = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (p.table != nullptr && 2 * static_cast<int64_t>(sms) * p.heads * p.tokens * p.tokens > kMixStreamMaxTableSums)
    return false;
  const int D = mix_stream_dim(p.dim_k, p.dim_v);
  const size_t need = mix_split_bwd_shape(p.heads, D)
                          ? std::max(mix_split_bwd_layout(p.heads, D, false).total, mix_split_bwd_layout(p.heads, D, true).total)
                          : mix_stream_bwd_layout(p.heads, D).total;
  return need <= static_cast<size_t>(optin);
}

}  // namespace vitfast
