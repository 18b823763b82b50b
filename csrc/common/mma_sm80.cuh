// Register-level tensor-core building blocks (sm_80+, fp16/bf16): ldmatrix and mma.sync.m16n8k16
// with fp32 accumulators, the FlashAttention-2 way of keeping S, P and O in registers instead of
// WMMA's store-to-shared round trips. Torch-free.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), lane = 4 * g + t (g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16 x 8, k x n):      b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g)
//   C (16 x 8, fp32):       c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
// so two neighbouring C tiles (n 0-7, 8-15) pack into one A fragment of a 16 x 16 product (P of
// softmax(S) feeding P V without leaving registers).
//
// Under the CPU emulator (VITFAST_CUDA_EMULATION) the same functions exchange operands through the
// warp (each lane publishes its registers, then computes its own outputs), with ldmatrix's
// 16-byte row alignment checked, so the lane mappings of the kernels are tested on CI.
#pragma once

#include <cstdint>

#include "cuda_compat.cuh"

namespace vitfast {
namespace mma {

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

#ifdef VITFAST_CUDA_EMULATION

template <>
inline uint32_t pack2<__half>(float lo, float hi) {
  return static_cast<uint32_t>(__float2half_rn(lo).bits) | (static_cast<uint32_t>(__float2half_rn(hi).bits) << 16);
}
template <>
inline uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return static_cast<uint32_t>(__float2bfloat16_rn(lo).bits) |
         (static_cast<uint32_t>(__float2bfloat16_rn(hi).bits) << 16);
}

namespace detail {
// Publishes one 64-bit value per lane; returns all 32 of the warp.
inline void exchange(uint64_t mine, uint64_t (&all)[32]) {
  auto* blk = emu::current;
  const unsigned tid = emu_linear_tid(), lane = tid & 31, base = tid - lane;
  blk->lanes[tid] = mine;
  __syncwarp();
  for (int l = 0; l < 32; ++l) all[l] = blk->lanes[base + l];
  __syncwarp();
}
inline uint16_t bits_at(const void* row, int c) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(row) + 2 * c, 2);
  return v;
}
template <int kMats, bool kTrans>
inline void ldmatrix(uint32_t* r, const void* row_ptr) {
  if (reinterpret_cast<uintptr_t>(row_ptr) % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  uint64_t addr[32];
  exchange(reinterpret_cast<uint64_t>(row_ptr), addr);
  const int lane = static_cast<int>(emu_linear_tid() & 31), g = lane / 4, t = lane % 4;
  for (int m = 0; m < kMats; ++m) {
    uint16_t lo, hi;
    if (!kTrans) {  // row g of matrix m, columns 2t, 2t+1
      const void* row = reinterpret_cast<const void*>(addr[8 * m + g]);
      lo = bits_at(row, 2 * t);
      hi = bits_at(row, 2 * t + 1);
    } else {  // column g, rows 2t and 2t+1
      lo = bits_at(reinterpret_cast<const void*>(addr[8 * m + 2 * t]), g);
      hi = bits_at(reinterpret_cast<const void*>(addr[8 * m + 2 * t + 1]), g);
    }
    r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}
template <typename T>
inline float half_to_float(uint16_t b) {
  if constexpr (std::is_same_v<T, __half>) return vitfast::half_bits_to_float(b);
  else return vitfast::bf16_bits_to_float(b);
}
}  // namespace detail

// Lane l passes the address of row (l % 8) of matrix (l / 8): x4 gives r[m] of matrix m.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) { detail::ldmatrix<4, false>(r, row_ptr); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) { detail::ldmatrix<4, true>(r, row_ptr); }

// d += A (16 x 16) B (16 x 8), fp32 accumulation
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  uint64_t a01[32], a23[32], bb[32];
  detail::exchange(static_cast<uint64_t>(a[0]) | (static_cast<uint64_t>(a[1]) << 32), a01);
  detail::exchange(static_cast<uint64_t>(a[2]) | (static_cast<uint64_t>(a[3]) << 32), a23);
  detail::exchange(static_cast<uint64_t>(b[0]) | (static_cast<uint64_t>(b[1]) << 32), bb);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t ra[4] = {static_cast<uint32_t>(a01[l]), static_cast<uint32_t>(a01[l] >> 32),
                            static_cast<uint32_t>(a23[l]), static_cast<uint32_t>(a23[l] >> 32)};
    for (int j = 0; j < 4; ++j) {
      const int row = g + 8 * (j & 1), col = 2 * t + 8 * (j >> 1);
      A[row][col] = detail::half_to_float<T>(static_cast<uint16_t>(ra[j]));
      A[row][col + 1] = detail::half_to_float<T>(static_cast<uint16_t>(ra[j] >> 16));
    }
    const uint32_t rb[2] = {static_cast<uint32_t>(bb[l]), static_cast<uint32_t>(bb[l] >> 32)};
    for (int j = 0; j < 2; ++j) {
      B[2 * t + 8 * j][g] = detail::half_to_float<T>(static_cast<uint16_t>(rb[j]));
      B[2 * t + 8 * j + 1][g] = detail::half_to_float<T>(static_cast<uint16_t>(rb[j] >> 16));
    }
  }
  const int lane = static_cast<int>(emu_linear_tid() & 31), g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    const int row = g + 8 * (j >> 1), col = 2 * t + (j & 1);
    float s = d[j];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[j] = s;
  }
}

#else  // real device code

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  (void)r;
  (void)row_ptr;
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  (void)r;
  (void)row_ptr;
  __trap();
#endif
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  (void)d;
  (void)a;
  (void)b;
  __trap();
#endif
}

#endif  // VITFAST_CUDA_EMULATION

}  // namespace mma
}  // namespace vitfast
