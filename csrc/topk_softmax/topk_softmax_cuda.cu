// CUDA top-k softmax: one thread block per row, exact radix select.
//
// Each row is read from global memory once (16-byte loads) and staged in shared memory when it
// fits. That first pass also computes the row's max and exp-sum (online softmax) and the
// histogram of the first radix digit. The k-th largest element is then found by radix select
// over unique 64-bit composite keys (radix_select.h, shared with the CPU path): exactly k
// elements pass the final threshold and ties resolve to the lower index without a separate pass.
// The k survivors are bitonic-sorted in shared memory and converted to probabilities.

#include <cstdint>

#include "../common/cuda_compat.cuh"
#include "../common/cuda_rows.cuh"
#include "radix_select.h"
#include "topk_softmax.h"

namespace vitfast {
namespace {

using radix::kBins;

struct HalfTraits {
  using Bits = uint16_t;
  static constexpr int kKeyBits = 16;
  __device__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static uint32_t key(Bits b) { return half_order_key(b); }
};
struct BF16Traits {
  using Bits = uint16_t;
  static constexpr int kKeyBits = 16;
  __device__ static float to_float(Bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  __device__ static uint32_t key(Bits b) { return bf16_order_key(b); }
};
struct F32Traits {
  using Bits = uint32_t;
  static constexpr int kKeyBits = 32;
  __device__ static float to_float(Bits b) { return __uint_as_float(b); }
  __device__ static uint32_t key(Bits b) { return float_order_key(__uint_as_float(b)); }
};

// Shared-memory layout, in this order (each piece a multiple of 16 bytes).
struct SmemLayout {
  int kpad;         // k rounded up to a power of two (bitonic sort size)
  size_t cand;      // kpad * 8
  size_t hist;      // kBins * 4
  size_t scratch;   // 32 floats (max) + 32 floats (sum) + 16 ints
  size_t row;       // staged row, 0 if not staged
  size_t total() const { return cand + hist + scratch + row; }
};

__host__ __device__ inline int round_up_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Merge two (max, sum-of-exp) pairs of an online softmax.
__device__ __forceinline__ void merge_softmax(float& m, float& s, float om, float os, float inv_t) {
  const float M = fmaxf(m, om);
  if (M == -INFINITY) return;  // both empty
  s = s * __expf((m - M) * inv_t) + os * __expf((om - M) * inv_t);
  m = M;
}

template <typename Traits, bool kStaged>
__global__ void topk_softmax_kernel(TopkSoftmaxParams p, SmemLayout L) {
  using Bits = typename Traits::Bits;
  constexpr int V = 16 / sizeof(Bits);
  VF_DYNAMIC_SMEM(smem);
  uint64_t* cand = reinterpret_cast<uint64_t*>(smem);
  uint32_t* hist = reinterpret_cast<uint32_t*>(smem + L.cand);
  float* red_m = reinterpret_cast<float*>(smem + L.cand + L.hist);
  float* red_s = red_m + 32;
  int* misc = reinterpret_cast<int*>(red_s + 32);
  Bits* srow = reinterpret_cast<Bits*>(smem + L.cand + L.hist + L.scratch);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int nwarps = blockDim.x >> 5;
  const int C = static_cast<int>(p.cols);
  const int k = p.k;
  const float inv_t = p.inv_temperature;
  const int64_t row = blockIdx.x;
  const Bits* x = static_cast<const Bits*>(p.logits) + row * p.row_stride;

  const int head = aligned_head(x, C);
  const int pad = (V - head % V) % V;

  for (int i = tid; i < kBins; i += blockDim.x) hist[i] = 0;
  if (tid == 0) misc[3] = 0;  // candidate counter
  __syncthreads();

  const uint32_t cmax = static_cast<uint32_t>(C - 1);
  const int index_bits = radix::index_bits(cmax);
  auto composite = [&](int j, Bits b) { return radix::composite(Traits::key(b), static_cast<uint32_t>(j), cmax); };

  // Pass 0: stage, online softmax, first-digit histogram.
  float tm = -INFINITY, ts = 0.0f;
  bool bad = false;
  auto visit0 = [&](int j, Bits b) {
    if (kStaged) srow[j + pad] = b;
    const float v = Traits::to_float(b);
    if (v != v || v == INFINITY) {
      bad = true;
    } else if (v != -INFINITY) {
      if (v > tm) {
        ts = ts * __expf((tm - v) * inv_t) + 1.0f;
        tm = v;
      } else {
        ts += __expf((v - tm) * inv_t);
      }
    }
    atomicAdd(&hist[(Traits::key(b) >> (Traits::kKeyBits - 8)) & 0xFF], 1u);
  };
  for_each_global<Bits>(x, C, head, visit0);

  // Block reduction of the online softmax state.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, tm, off);
    const float os = __shfl_xor_sync(0xffffffffu, ts, off);
    merge_softmax(tm, ts, om, os, inv_t);
  }
  if (lane == 0) {
    red_m[warp] = tm;
    red_s[warp] = ts;
  }
  bad = __syncthreads_or(bad);  // also the barrier for red_* and hist
  if (warp == 0) {
    tm = lane < nwarps ? red_m[lane] : -INFINITY;
    ts = lane < nwarps ? red_s[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, tm, off);
      const float os = __shfl_xor_sync(0xffffffffu, ts, off);
      merge_softmax(tm, ts, om, os, inv_t);
    }
  }
  // (broadcast of max/sum happens through red_m[0]/red_s[0] after the next barrier)

  const int64_t out = row * k;
  auto store = [&](int i, float v, int idx) {
    if (p.values_dtype == DType::kFloat16) {
      static_cast<__half*>(p.values)[out + i] = __float2half_rn(v);
    } else {
      static_cast<float*>(p.values)[out + i] = v;
    }
    if (p.indices_dtype == DType::kInt16) {
      static_cast<int16_t*>(p.indices)[out + i] = static_cast<int16_t>(idx);
    } else {
      static_cast<int32_t*>(p.indices)[out + i] = idx;
    }
  };

  __syncthreads();  // every warp-0 read of red_* is done before lane 0 overwrites slot 0
  if (tid == 0) {
    red_m[0] = tm;
    red_s[0] = ts;
  }
  // A row without a finite max (all -inf) has no softmax either.
  if (bad) {
    for (int i = tid; i < k; i += blockDim.x) store(i, __int_as_float(0x7fc00000), i);
    return;
  }

  // Radix select over the composite key (decisions in radix_select.h, shared with the CPU).
  radix::State st;
  st.need = k;
  int shift = radix::first_shift(Traits::kKeyBits);
  while (true) {
    __syncthreads();  // histogram complete
    if (warp == 0) {
      // Warp-parallel find_bucket: lane l owns bins 255-8l ... 248-8l, so lane order is key order.
      uint32_t c[8];
      uint32_t tot = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        c[i] = hist[255 - 8 * lane - i];
        tot += c[i];
      }
      uint32_t incl = tot;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const uint32_t o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      uint32_t above = incl - tot;
      const uint32_t need = static_cast<uint32_t>(st.need);
      if (above < need && need <= incl) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (above < need && need <= above + c[i]) {
            misc[0] = 255 - 8 * lane - i;
            misc[1] = static_cast<int>(above);
            misc[2] = static_cast<int>(c[i]);
          }
          above += c[i];
        }
      }
    }
    __syncthreads();
    radix::advance(st, shift, misc[0], static_cast<uint32_t>(misc[1]), static_cast<uint32_t>(misc[2]));
    if (st.done) break;
    shift = radix::next_shift(shift, index_bits);  // >= 0 here: composites are unique
    for (int i = tid; i < kBins; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    auto visit = [&](int j, Bits b) {
      const uint64_t c = composite(j, b);
      if (radix::matches(st, c)) atomicAdd(&hist[(c >> shift) & 0xFF], 1u);
    };
    if (kStaged) {
      for_each_staged<Bits>(srow, C, pad, visit);
    } else {
      for_each_global<Bits>(x, C, head, visit);
    }
  }

  // Collect exactly k survivors, then sort them descending (value desc, index asc).
  for (int i = k + tid; i < L.kpad; i += blockDim.x) cand[i] = 0;  // pads sort last
  auto collect = [&](int j, Bits b) {
    const uint64_t c = composite(j, b);
    if (radix::selected(st, c)) {
      const int slot = atomicAdd(&misc[3], 1);
      if (slot < k) cand[slot] = c;  // exactly k pass by construction; never write past them
    }
  };
  if (kStaged) {
    for_each_staged<Bits>(srow, C, pad, collect);
  } else {
    for_each_global<Bits>(x, C, head, collect);
  }
  __syncthreads();
  for (int size = 2; size <= L.kpad; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < L.kpad; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool desc = (i & size) == 0;
          const uint64_t a = cand[i], b = cand[j];
          if ((a < b) == desc) {
            cand[i] = b;
            cand[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }

  const float m = red_m[0];
  const float inv_sum = 1.0f / red_s[0];
  for (int i = tid; i < k; i += blockDim.x) {
    const int j = static_cast<int>(radix::index_of(cand[i], cmax));
    const Bits b = kStaged ? srow[j + pad] : x[j];
    store(i, expf((Traits::to_float(b) - m) * inv_t) * inv_sum, j);
  }
}

template <typename Traits>
cudaError_t launch(const TopkSoftmaxParams& p, cudaStream_t stream) {
  using Bits = typename Traits::Bits;
  constexpr int V = 16 / sizeof(Bits);
  SmemLayout L{};
  L.kpad = round_up_pow2(p.k);
  L.cand = (static_cast<size_t>(L.kpad) * 8 + 15) / 16 * 16;  // the staged row needs 16-byte alignment
  L.hist = kBins * 4;
  L.scratch = 64 * 4 + 16 * 4;
  const size_t row_bytes = ((static_cast<size_t>(p.cols) + 2 * V - 1) / V) * 16;

  int device = 0, max_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const bool staged = L.total() + row_bytes <= static_cast<size_t>(max_optin);
  if (staged) L.row = row_bytes;

  // Enough threads to stream the row; small rows keep blocks small so more fit per SM.
  const int threads = p.cols <= 1024 ? 128 : (p.cols <= 4096 ? 256 : 512);
  const size_t bytes = L.total();
  auto kernel = staged ? topk_softmax_kernel<Traits, true> : topk_softmax_kernel<Traits, false>;
  if (bytes > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  VF_LAUNCH(kernel, static_cast<unsigned>(p.rows), threads, bytes, stream, p, L);
  return cudaGetLastError();
}

}  // namespace

int topk_softmax_cuda(const TopkSoftmaxParams& p, void* stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.logits_dtype) {
    case DType::kFloat16:
      return launch<HalfTraits>(p, s);
    case DType::kBFloat16:
      return launch<BF16Traits>(p, s);
    case DType::kFloat32:
      return launch<F32Traits>(p, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace vitfast
