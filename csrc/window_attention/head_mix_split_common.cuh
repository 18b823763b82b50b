// What the head-split kernels (head_mix_split_fwd.cuh, head_mix_split_bwd.cuh) share: 8 warps,
// 16 resident rows of every head per block, products of a few heads per warp exchanged through
// shared memory, each entry mixed over every head by one thread, the mixing weights as rows.
#pragma once

#include "head_mix_stream.cuh"

namespace vitfast {
namespace {

constexpr int kMixSplitThreads = kMixSplitWarps * 32;

// The mixing parameters in shared memory as rows, so that every sum over heads reads 16-byte
// vectors: [pre * scale (g, h) | its transpose (h, g) | post (g, h) | its transpose | post_bias].
template <int kH>
struct MixSplitWeights {
  static_assert(kH % 4 == 0, "rows of 16-byte vectors");
  const float* w;
  enum Section { kPre = 0, kPreT = 1, kPost = 2, kPostT = 3 };

  static __device__ __forceinline__ void fill(const WindowAttentionParams& p, float scale, float* dst) {
    constexpr int n = kH * kH;
    for (int e = threadIdx.x; e < 4 * n + kH; e += kMixSplitThreads) {
      const int part = e / n, r = e - part * n;
      int src = 2 * n + (e - 4 * n);  // post_bias
      if (part < 4) {
        const int i = r / kH, j = r - i * kH;
        src = (part >> 1) * n + ((part & 1) ? j * kH + i : r);
      }
      dst[e] = MixRegWeights<kH>::mix_weight(p, scale, src);
    }
  }
  // sum_j row(i)[j] x[j], j in order
  __device__ __forceinline__ float dot(Section s, int i, const float (&x)[kH]) const {
    const float4* r = reinterpret_cast<const float4*>(w + s * kH * kH + i * kH);
    float acc = 0.0f;
#pragma unroll
    for (int u = 0; u < kH / 4; ++u) {
      const float4 v = r[u];
      acc += v.x * x[4 * u];
      acc += v.y * x[4 * u + 1];
      acc += v.z * x[4 * u + 2];
      acc += v.w * x[4 * u + 3];
    }
    return acc;
  }
  __device__ __forceinline__ float post_bias(int g) const { return w[4 * kH * kH + g]; }
};

// The warp's product of heads h0 .. h0 + kHW - 1 (resident rows `a` against tile `b`, both one
// 16 x (D + 8) block per head), written to the float exchange x[head][row][column].
template <typename T, int kHW, int D>
__device__ __forceinline__ void mix_split_products(const T* a, const T* b, int h0, float* x, int lane) {
  constexpr int kTile = kMixSplitRows * (D + 8);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hi = 0; hi < kHW; ++hi) {
    const int h = h0 + hi;
    float c[1][2][4];
    mix_stream_products<T, 1, D>(a + h * kTile, 0, b + h * kTile, lane, c);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) x[h * kMixSplitXPitch + (g + 8 * (e >> 1)) * 16 + 8 * j + 2 * t + (e & 1)] = c[0][j][e];
    }
  }
}

// The A fragment of head h's 16 x 16 tile in a 16-bit exchange.
template <typename T>
__device__ __forceinline__ void mix_split_a(const T* y, int h, int lane, uint32_t (&a)[4]) {
  mma::ldmatrix_x4(a, y + (h * kMixSplitRows + (lane & 15)) * kMixSplitYLd + (lane >> 4) * 8);
}

// acc_h += Y_h R_h for the warp's heads h = h0 .. h0 + kHW - 1: Y_h head h's 16 x 16 tile of a
// 16-bit exchange, R_h columns col0 .. col0 + DC - 1 of head h's 16-row tile `rows` (pitch D + 8).
template <typename T, int kHW, int DC, int D>
__device__ __forceinline__ void mix_split_accumulate(float (&acc)[kHW][DC / 8][4], const T* y, const T* rows, int h0,
                                                     int col0, int lane) {
  constexpr int ld = D + 8, kTile = kMixSplitRows * ld;
#pragma unroll
  for (int hi = 0; hi < kHW; ++hi) {
    uint32_t a[4];
    mix_split_a<T>(y, h0 + hi, lane, a);
    mma_times_rows<T, DC>(acc[hi], a, rows + (h0 + hi) * kTile + col0, ld, lane);
  }
}

// One 16-row tile of every head of two roles (rows row0 ..) into buffer buf of the two tile regions
// at byte offsets tile_a / tile_b (buffers `pitch` bytes apart).
template <typename T, int kH, int D, bool kVec>
__device__ __forceinline__ void mix_split_issue_pair(const WindowAttentionParams& p, const MixRows<T>& a,
                                                     const MixRows<T>& b, int64_t w, unsigned char* smem,
                                                     size_t tile_a, size_t tile_b, size_t pitch, int buf, int row0) {
  mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, a, w, reinterpret_cast<T*>(smem + tile_a + buf * pitch), 0, kH,
                                                     row0, kMixStreamKeys);
  mix_stream_issue<T, kH, D, kVec, kMixSplitThreads>(p, b, w, reinterpret_cast<T*>(smem + tile_b + buf * pitch), 0, kH,
                                                     row0, kMixStreamKeys);
}

}  // namespace
}  // namespace vitfast
