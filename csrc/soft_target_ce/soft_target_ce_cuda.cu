// CUDA sparse soft-target cross-entropy. One block per row; the dense target is never formed.
//
// Forward: one streaming pass over the row (online max/exp-sum and plain sum) plus a gather of
// the k stored classes; writes the row loss and its logsumexp. Backward recomputes softmax from
// the logits and the saved logsumexp: one read and one write of the row (16-byte accesses), then
// the k stored classes are overwritten with their own target. Total traffic per row for
// forward + backward: 2 reads + 1 write of C elements in the logits dtype.

#include <cstdint>
#include <cstdio>

#include "../common/cuda_compat.cuh"
#include "../common/cuda_dtype.cuh"
#include "../common/cuda_rows.cuh"
#include "soft_target_ce.h"

namespace vitfast {
namespace {

template <typename T>
struct Num {
  using Acc = float;
  __device__ static float to_acc(T v) { return static_cast<float>(v); }
  __device__ static T from_acc(float v) { return static_cast<T>(v); }
  __device__ static float exp(float v) { return expf(v); }
};
template <>
struct Num<__half> {
  using Acc = float;
  __device__ static float to_acc(__half v) { return __half2float(v); }
  __device__ static __half from_acc(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  using Acc = float;
  __device__ static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Num<double> {
  using Acc = double;
  __device__ static double to_acc(double v) { return v; }
  __device__ static double from_acc(double v) { return v; }
  __device__ static double exp(double v) { return ::exp(v); }
};

__device__ __forceinline__ int64_t load_index(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kInt16:
      return static_cast<const int16_t*>(base)[i];
    case DType::kInt32:
      return static_cast<const int32_t*>(base)[i];
    default:
      return static_cast<const int64_t*>(base)[i];
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename A>
__device__ __forceinline__ void merge_softmax(A& m, A& s, A om, A os) {
  const A M = m > om ? m : om;
  if (M == -INFINITY) return;
  s = s * Num<A>::exp(m - M) + os * Num<A>::exp(om - M);
  m = M;
}

// Remaining mass u and total target mass S of row r, computed by each warp on its own
// (k is small) so that no block barrier is needed.
template <typename A>
__device__ __forceinline__ void target_mass(const SoftTargetCEParams& p, int64_t r, A* u, A* S) {
  A sv = 0;
  for (int i = threadIdx.x & 31; i < p.k; i += 32) sv += load_as<A>(p.values, p.values_dtype, r * p.k + i);
  sv = warp_sum(sv);
  *u = p.cols > p.k ? (A(1) - sv) / static_cast<A>(p.cols - p.k) : A(0);
  *S = sv + *u * static_cast<A>(p.cols - p.k);
}

template <typename T>
__global__ void soft_target_ce_forward_kernel(SoftTargetCEParams p, int kpad) {
  using A = typename Num<T>::Acc;
  VF_DYNAMIC_SMEM(smem);
  int64_t* sidx = reinterpret_cast<int64_t*>(smem);  // kpad sorted indices
  double* red = reinterpret_cast<double*>(sidx + kpad);  // 5 x 32 partials

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const int64_t row = blockIdx.x;
  const int C = static_cast<int>(p.cols);
  const int k = p.k;
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;

  // The linear terms sum in double (as on the CPU): the loss is S lse - sum_j t_j x_j, a small
  // difference of two large numbers when the logits are large (a float32 sum of 1e4-sized logits
  // loses ~1e-3 absolute).
  A m = -INFINITY, s = 0;
  double sum_all = 0;
  for_each_global<T>(x, C, aligned_head(x, C), [&](int, T b) {
    const A v = Num<T>::to_acc(b);
    sum_all += static_cast<double>(v);
    if (v == -INFINITY) {
      // probability 0; keeps exp(-inf - -inf) out of the sum
    } else if (v > m) {
      s = s * Num<A>::exp(m - v) + A(1);
      m = v;
    } else {
      s += Num<A>::exp(v - m);
    }
  });

  // Stored classes: validate, gather, and stage for the duplicate check.
  bool bad_range = false;
  double sum_gathered = 0, dot = 0;
  for (int i = tid; i < kpad; i += blockDim.x) {
    if (i < k) {
      const int64_t j = load_index(p.indices, p.indices_dtype, row * k + i);
      sidx[i] = j;
      if (j < 0 || j >= C) {
        bad_range = true;
      } else {
        const double xj = static_cast<double>(Num<T>::to_acc(x[j]));
        sum_gathered += xj;
        dot += static_cast<double>(load_as<A>(p.values, p.values_dtype, row * k + i)) * xj;
      }
    } else {
      sidx[i] = INT64_MAX;  // pads sort last and never equal a real index
    }
  }

#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    merge_softmax<A>(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  }
  sum_all = warp_sum(sum_all);
  sum_gathered = warp_sum(sum_gathered);
  dot = warp_sum(dot);
  if (lane == 0) {
    red[warp] = m;
    red[32 + warp] = s;
    red[64 + warp] = sum_all;
    red[96 + warp] = sum_gathered;
    red[128 + warp] = dot;
  }
  if (__syncthreads_or(bad_range)) {
    if (tid == 0) printf("vitfast: sparse_soft_target_cross_entropy: indices out of [0, %d) in row %lld\n", C, static_cast<long long>(row));
    __trap();
  }

  // Duplicate check: bitonic sort of the row's indices, then compare neighbours.
  for (int size = 2; size <= kpad; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < kpad; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool asc = (i & size) == 0;
          const int64_t a = sidx[i], b = sidx[j];
          if ((a > b) == asc) {
            sidx[i] = b;
            sidx[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  bool dup = false;
  for (int i = tid; i + 1 < k; i += blockDim.x) dup |= sidx[i] == sidx[i + 1];
  if (__syncthreads_or(dup)) {
    if (tid == 0) printf("vitfast: sparse_soft_target_cross_entropy: duplicate entries in indices row %lld\n", static_cast<long long>(row));
    __trap();
  }

  if (warp == 0) {
    m = lane < nwarps ? static_cast<A>(red[lane]) : A(-INFINITY);
    s = lane < nwarps ? static_cast<A>(red[32 + lane]) : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      merge_softmax<A>(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
    }
    sum_all = warp_sum(lane < nwarps ? red[64 + lane] : 0.0);
    sum_gathered = warp_sum(lane < nwarps ? red[96 + lane] : 0.0);
    dot = warp_sum(lane < nwarps ? red[128 + lane] : 0.0);
    double u, S;  // S multiplies the lse: in double, as the linear terms
    target_mass<double>(p, row, &u, &S);
    if (lane == 0) {
      const double lse = static_cast<double>(m) + static_cast<double>(log(s));
      static_cast<A*>(p.loss)[row] =
          static_cast<A>(S * lse - (u * (sum_all - sum_gathered) + dot));
      static_cast<double*>(p.lse)[row] = lse;
    }
  }
}

template <typename T>
__global__ void soft_target_ce_backward_kernel(SoftTargetCEParams p) {
  using A = typename Num<T>::Acc;
  constexpr int V = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const int C = static_cast<int>(p.cols);
  const int k = p.k;
  const T* x = static_cast<const T*>(p.logits) + row * p.row_stride;
  T* y = static_cast<T*>(p.grad_logits) + row * static_cast<int64_t>(C);
  const A g = static_cast<const A*>(p.grad_loss)[row * p.grad_stride];
  // lse = hi + lo: x - hi is exact for every x that matters (Sterbenz), so the per-element math
  // stays in A at the logits' full resolution
  const double lse = static_cast<const double*>(p.lse_in)[row];
  const A lse_hi = static_cast<A>(lse), lse_lo = static_cast<A>(lse - static_cast<double>(lse_hi));
  A u, S;
  target_mass<A>(p, row, &u, &S);
  auto grad = [&](T xj, A t) { return Num<T>::from_acc(g * (S * Num<A>::exp((Num<T>::to_acc(xj) - lse_hi) - lse_lo) - t)); };

  // Dense part: every class gets the remaining-mass target u. Stores are 16 bytes wide; loads
  // are too when the input row shares the output's alignment (the usual contiguous case).
  const int head = aligned_head(y, C);
  const bool vec_in = (reinterpret_cast<uintptr_t>(x + head) & 15) == 0;
  for (int j = threadIdx.x; j < head; j += blockDim.x) y[j] = grad(x[j], u);
  const int nvec = (C - head) / V;
  for (int w = threadIdx.x; w < nvec; w += blockDim.x) {
    union {
      uint4 u4;
      T e[V];
    } in, out;
    if (vec_in) {
      in.u4 = __ldg(reinterpret_cast<const uint4*>(x + head) + w);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) in.e[i] = x[head + w * V + i];
    }
#pragma unroll
    for (int i = 0; i < V; ++i) out.e[i] = grad(in.e[i], u);
    reinterpret_cast<uint4*>(y + head)[w] = out.u4;
  }
  for (int j = head + nvec * V + threadIdx.x; j < C; j += blockDim.x) y[j] = grad(x[j], u);
  __syncthreads();  // the dense stores above are ordered before the overwrites below

  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t j = load_index(p.indices, p.indices_dtype, row * k + i);
    if (j < 0 || j >= C) {
      printf("vitfast: sparse_soft_target_cross_entropy backward: index %lld out of [0, %d) in row %lld\n",
             static_cast<long long>(j), C, static_cast<long long>(row));
      __trap();
    }
    y[j] = grad(x[j], load_as<A>(p.values, p.values_dtype, row * k + i));
  }
}

int threads_for(int64_t cols) { return cols <= 1024 ? 128 : (cols <= 4096 ? 256 : 512); }

int round_up_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

template <typename T>
cudaError_t launch_forward(const SoftTargetCEParams& p, cudaStream_t stream) {
  const int kpad = round_up_pow2(p.k);
  const size_t bytes = static_cast<size_t>(kpad) * 8 + 5 * 32 * sizeof(double);
  VF_LAUNCH(soft_target_ce_forward_kernel<T>, static_cast<unsigned>(p.rows), threads_for(p.cols), bytes, stream, p,
            kpad);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const SoftTargetCEParams& p, cudaStream_t stream) {
  VF_LAUNCH(soft_target_ce_backward_kernel<T>, static_cast<unsigned>(p.rows), threads_for(p.cols), 0, stream, p);
  return cudaGetLastError();
}

}  // namespace

int soft_target_ce_forward_cuda(const SoftTargetCEParams& p, void* stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.logits_dtype) {
    case DType::kFloat16:
      return launch_forward<__half>(p, s);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(p, s);
    case DType::kFloat32:
      return launch_forward<float>(p, s);
    case DType::kFloat64:
      return launch_forward<double>(p, s);
    default:
      return cudaErrorInvalidValue;
  }
}

int soft_target_ce_backward_cuda(const SoftTargetCEParams& p, void* stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.logits_dtype) {
    case DType::kFloat16:
      return launch_backward<__half>(p, s);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(p, s);
    case DType::kFloat32:
      return launch_backward<float>(p, s);
    case DType::kFloat64:
      return launch_backward<double>(p, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace vitfast
