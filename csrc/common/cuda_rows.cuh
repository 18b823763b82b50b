// Row-streaming helpers shared by the CUDA kernels (torch-free).
#pragma once

#include "cuda_compat.cuh"

#include <cstdint>

namespace vitfast {

// Elements before the first 16-byte boundary of x (at most C).
template <typename Bits>
__device__ __forceinline__ int aligned_head(const Bits* x, int C) {
  const int head = static_cast<int>(((16 - (reinterpret_cast<uintptr_t>(x) & 15)) & 15) / sizeof(Bits));
  return head < C ? head : C;
}

// Visit every element of a global row with 16-byte loads: scalar head up to the first aligned
// address, vector body, scalar tail. f(j, bits) is called once per element.
template <typename Bits, typename F>
__device__ __forceinline__ void for_each_global(const Bits* x, int C, int head, F&& f) {
  constexpr int V = 16 / sizeof(Bits);
  for (int j = threadIdx.x; j < head; j += blockDim.x) f(j, x[j]);
  const int nvec = (C - head) / V;
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  int w = threadIdx.x;
  // Two vectors in flight per thread before the first use.
  for (; w + static_cast<int>(blockDim.x) < nvec; w += 2 * blockDim.x) {
    const uint4 u0 = __ldg(xv + w);
    const uint4 u1 = __ldg(xv + w + blockDim.x);
    const Bits* e0 = reinterpret_cast<const Bits*>(&u0);
    const Bits* e1 = reinterpret_cast<const Bits*>(&u1);
#pragma unroll
    for (int i = 0; i < V; ++i) f(head + w * V + i, e0[i]);
#pragma unroll
    for (int i = 0; i < V; ++i) f(head + (w + blockDim.x) * V + i, e1[i]);
  }
  if (w < nvec) {
    const uint4 u0 = __ldg(xv + w);
    const Bits* e0 = reinterpret_cast<const Bits*>(&u0);
#pragma unroll
    for (int i = 0; i < V; ++i) f(head + w * V + i, e0[i]);
  }
  for (int j = head + nvec * V + threadIdx.x; j < C; j += blockDim.x) f(j, x[j]);
}

// Visit every element of the staged row. Element j lives at srow[j + pad], where pad makes the
// global vector body land on 16-byte boundaries in shared memory.
template <typename Bits, typename F>
__device__ __forceinline__ void for_each_staged(const Bits* srow, int C, int pad, F&& f) {
  constexpr int V = 16 / sizeof(Bits);
  const int nv = (pad + C + V - 1) / V;
  for (int w = threadIdx.x; w < nv; w += blockDim.x) {
    const uint4 u = reinterpret_cast<const uint4*>(srow)[w];
    const Bits* e = reinterpret_cast<const Bits*>(&u);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int j = w * V + i - pad;
      if (j >= 0 && j < C) f(j, e[i]);
    }
  }
}

}  // namespace vitfast
