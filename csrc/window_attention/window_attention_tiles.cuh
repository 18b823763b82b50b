// Warp-level building blocks of the window-attention kernels (torch-free): element conversions,
// shared-memory carving, and a 16 x 16 tile product whose operands live in shared memory.
//
// All element-wise work (bias gather, masking, softmax, dS) happens on tiles in shared memory, so
// the only dtype-specific code is warp_mma: tensor cores (WMMA) for fp16/bf16, SIMT for fp32/fp64.
#pragma once

#include "../common/cuda_compat.cuh"

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace vitfast {
namespace wa {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return static_cast<T>(x); }

template <typename T>
__device__ __forceinline__ T zero() { return from_acc<T>(0.0f); }
template <>
__device__ __forceinline__ double zero<double>() { return 0.0; }

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

template <typename Acc>
__device__ __forceinline__ Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

// Hands out 128-byte aligned regions of one dynamic shared-memory buffer. The host runs the same
// carving on a null base to size the buffer, so kernel and launch can't disagree.
struct SmemCarver {
  unsigned char* base;
  size_t offset = 0;
  template <typename U>
  __host__ __device__ U* take(size_t count) {
    offset = (offset + 127) & ~static_cast<size_t>(127);
    U* r = reinterpret_cast<U*>(base + offset);
    offset += count * sizeof(U);
    return r;
  }
};

__host__ __device__ constexpr int round16(int x) { return (x + 15) / 16 * 16; }
// Leading dims: +8 elements breaks bank conflicts and keeps WMMA's 16-byte/32-byte rules
// (ldm a multiple of 8 elements for 16-bit types, of 4 for float accumulators).
__host__ __device__ constexpr int ld_in(int dim_padded) { return dim_padded + 8; }
__host__ __device__ constexpr int ld_acc(int dim_padded) { return dim_padded + 4; }

template <typename T>
struct UsesTensorCores : std::integral_constant<bool, std::is_same<T, __half>::value ||
                                                          std::is_same<T, __nv_bfloat16>::value> {};

// C (16 x 16, row-major, ldc) = [C +] A (16 x K) * B (K x 16), all in shared memory, K a multiple
// of 16. A(r, k) is a[r*lda + k] when kARowMajor, else a[k*lda + r] (A stored transposed);
// B(k, c) is b[k*ldb + c] when kBRowMajor, else b[c*ldb + k]. Whole warp; results are visible to
// the warp only after __syncwarp().
template <bool kARowMajor, bool kBRowMajor, typename T, typename Acc>
__device__ __forceinline__ void warp_mma(const T* a, int lda, const T* b, int ldb, Acc* c, int ldc, int K,
                                         bool accumulate) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  if constexpr (UsesTensorCores<T>::value) {
    namespace wmma = nvcuda::wmma;
    using LayoutA = typename std::conditional<kARowMajor, wmma::row_major, wmma::col_major>::type;
    using LayoutB = typename std::conditional<kBRowMajor, wmma::row_major, wmma::col_major>::type;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate) {
      wmma::load_matrix_sync(acc, c, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::load_matrix_sync(fa, kARowMajor ? a + k0 : a + static_cast<size_t>(k0) * lda, lda);
      wmma::load_matrix_sync(fb, kBRowMajor ? b + static_cast<size_t>(k0) * ldb : b + k0, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c, acc, ldc, wmma::mem_row_major);
    return;
  }
#endif
  // SIMT: lane owns row lane/2, columns (lane%2)*8 .. +8.
  const int lane = threadIdx.x & 31;
  const int r = lane >> 1, c0 = (lane & 1) * 8;
  Acc sum[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) sum[j] = accumulate ? c[r * ldc + c0 + j] : Acc(0);
  for (int k = 0; k < K; ++k) {
    const Acc av = to_acc(kARowMajor ? a[r * lda + k] : a[k * lda + r]);
#pragma unroll
    for (int j = 0; j < 8; ++j) sum[j] += av * to_acc(kBRowMajor ? b[k * ldb + c0 + j] : b[(c0 + j) * ldb + k]);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) c[r * ldc + c0 + j] = sum[j];
}

}  // namespace wa
}  // namespace vitfast
