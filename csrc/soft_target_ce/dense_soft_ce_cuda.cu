// CUDA dense soft-target cross-entropy (dense_soft_ce.h): loss and gradient of a row in one
// launch, neither softmax stored.
//
// A row is owned by a group of threads: one warp for rows of up to kWarpRowCols entries (8 rows
// per block: MiniViT's relation rows are 49-577 long and number millions), the whole block above.
// Each thread streams its strided share of the row once, keeping online (max, sum) for the
// student and (max, sum, sum of weight x student logit) for the teacher; the group merges them,
// then (if a gradient is wanted) re-reads its row -- from L1/L2, it was just read -- and writes
// student_scale (softmax(a) - softmax(b)). Traffic per row: 2 reads of each side (the second
// mostly cache hits) and one write, against ~15 full float32 passes for the eager form.
#include <cstdint>

#include "../common/cuda_compat.cuh"
#include "../common/cuda_dtype.cuh"
#include "dense_soft_ce.h"

namespace vitfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpRowCols = 1024;
constexpr int kUnroll = 4;

template <typename A>
__device__ __forceinline__ A exp_a(A v) {
  if constexpr (sizeof(A) == 8) return ::exp(v);
  else return __expf(v);
}

template <typename T, typename A>
__device__ __forceinline__ A to_acc(T v) {
  if constexpr (std::is_same<T, __half>::value) return static_cast<A>(__half2float(v));
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return static_cast<A>(__bfloat162float(v));
  else return static_cast<A>(v);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same<T, __half>::value) return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same<T, __nv_bfloat16>::value) return __float2bfloat16_rn(static_cast<float>(v));
  else return static_cast<T>(v);
}

// x * f with f a rescale factor in [0, 1]: 0 when f is 0, so that a -inf partial (the teacher
// weighting a student -inf) does not turn into NaN when its scale underflows
template <typename A>
__device__ __forceinline__ A times(A x, A f) {
  return f > A(0) ? x * f : A(0);
}

// Online state of one thread (or merged group): student (ma, sa), teacher (mb, sb, cb), where
// cb sums w (a - ref) with ref the row's first student logit: the loss (ma - ref) + log sa - cb / sb
// then keeps float32's precision at the spread of a row's logits, not at their size (logits near
// 1e4 would otherwise lose ~1e-3 to the cancellation of lse and the weighted mean).
//
// A NaN or +inf logit on either side leaves the row without a softmax: it is counted in `bad`
// (merged like the sums) and the row's loss and gradient come out NaN. (Without the count, a thread
// whose only entries were NaN keeps max -inf, and the merge's zero rescale would drop them.)
template <typename A>
struct State {
  A ma, sa, mb, sb, cb, ref, bad;

  __device__ void init() {
    ma = mb = -INFINITY;
    sa = sb = cb = bad = A(0);
  }
  __device__ void add(A a, A b) {
    if (!(a < A(INFINITY)) && a != -INFINITY) bad += A(1);
    if (!(b < A(INFINITY)) && b != -INFINITY) bad += A(1);
    if (a != -INFINITY) {  // probability 0; keeps exp(-inf - -inf) out of the sum
      if (a > ma) {
        sa = times(sa, exp_a(ma - a)) + A(1);
        ma = a;
      } else {
        sa += exp_a(a - ma);
      }
    }
    if (b != -INFINITY) {
      if (b > mb) {
        const A f = exp_a(mb - b);
        sb = times(sb, f) + A(1);
        cb = times(cb, f) + (a - ref);
        mb = b;
      } else {
        const A w = exp_a(b - mb);
        sb += w;
        cb += times(a - ref, w);
      }
    }
  }
  __device__ void merge(A oma, A osa, A omb, A osb, A ocb, A obad) {
    bad += obad;
    const A Ma = ma > oma ? ma : oma;
    if (Ma != -INFINITY) {
      sa = times(sa, exp_a(ma - Ma)) + times(osa, exp_a(oma - Ma));
      ma = Ma;
    }
    const A Mb = mb > omb ? mb : omb;
    if (Mb != -INFINITY) {
      const A f = exp_a(mb - Mb), of = exp_a(omb - Mb);
      sb = times(sb, f) + times(osb, of);
      cb = times(cb, f) + times(ocb, of);
      mb = Mb;
    }
  }
  __device__ void merge_warp() {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      merge(__shfl_xor_sync(0xffffffffu, ma, off), __shfl_xor_sync(0xffffffffu, sa, off),
            __shfl_xor_sync(0xffffffffu, mb, off), __shfl_xor_sync(0xffffffffu, sb, off),
            __shfl_xor_sync(0xffffffffu, cb, off), __shfl_xor_sync(0xffffffffu, bad, off));
    }
  }
};

// kBlock: the block owns row blockIdx.x; else warp w of the block owns row 8 blockIdx.x + w.
template <typename TS, typename A, bool kBlock>
__global__ void dense_soft_ce_kernel(DenseSoftCEParams p) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row = kBlock ? static_cast<int64_t>(blockIdx.x)
                             : static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + warp;
  if (row >= p.rows) return;  // whole warps only: the warp path has no block barrier
  // column indices: 64-bit on the block path, whose rows may come within a stride of 2^31 - 1
  using Index = typename std::conditional<kBlock, int64_t, int>::type;
  const Index first = kBlock ? tid : lane, step = kBlock ? kThreads : 32;
  const Index C = static_cast<Index>(p.cols);
  const TS* s = static_cast<const TS*>(p.student) + row * p.student_stride;
  const int64_t t0 = row * p.teacher_stride;
  const A ss = static_cast<A>(p.student_scale), ts = static_cast<A>(p.teacher_scale);

  State<A> st;
  st.init();
  const A a0 = ss * to_acc<TS, A>(s[0]);
  st.ref = isfinite(a0) ? a0 : A(0);
  // kUnroll loads of each side in flight per thread before they are used (memory-level
  // parallelism: a warp's row is only ~7 elements per lane at N = 197); a pad of -inf on both
  // sides adds nothing
  for (Index base = first; base < C; base += kUnroll * step) {
    A av[kUnroll], bv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const Index j = base + u * step;
      av[u] = j < C ? ss * to_acc<TS, A>(s[j]) : A(-INFINITY);
      bv[u] = j < C ? ts * load_as<A>(p.teacher, p.teacher_dtype, t0 + j) : A(-INFINITY);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) st.add(av[u], bv[u]);
  }
  st.merge_warp();
  if constexpr (kBlock) {
    VF_DYNAMIC_SMEM(smem);
    A* red = reinterpret_cast<A*>(smem);  // 6 x (kThreads / 32)
    constexpr int W = kThreads / 32;
    if (lane == 0) {
      red[warp] = st.ma;
      red[W + warp] = st.sa;
      red[2 * W + warp] = st.mb;
      red[3 * W + warp] = st.sb;
      red[4 * W + warp] = st.cb;
      red[5 * W + warp] = st.bad;
    }
    __syncthreads();
    // every warp merges the W partials itself (in the same order): no second barrier
    const A ref = st.ref;
    st.init();
    st.ref = ref;
    if (lane < W)
      st.merge(red[lane], red[W + lane], red[2 * W + lane], red[3 * W + lane], red[4 * W + lane], red[5 * W + lane]);
    st.merge_warp();
  }
  if (st.bad > A(0)) st.sa = st.sb = A(NAN);  // no softmax: NaN loss and gradient
  // exponents as (x - max) - log(sum): exact differences, never a rounded lse near a large max
  const A log_sa = static_cast<A>(log(st.sa));
  if (first == 0) {
    const A loss = (st.ma - st.ref) + log_sa - st.cb / st.sb;
    if (p.accumulate_double) static_cast<double*>(p.loss)[row] = static_cast<double>(loss);
    else static_cast<float*>(p.loss)[row] = static_cast<float>(loss);
  }
  if (!p.grad) return;
  const A log_sb = static_cast<A>(log(st.sb));
  // a teacher row without a finite logit has no softmax: NaN gradient, as its loss
  const A zero_q = st.sb > A(0) ? A(0) : A(NAN);
  TS* g = static_cast<TS*>(p.grad) + row * static_cast<int64_t>(C);
  for (Index base = first; base < C; base += kUnroll * step) {
    A av[kUnroll], bv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const Index j = base + u * step;
      av[u] = j < C ? ss * to_acc<TS, A>(s[j]) : A(0);
      bv[u] = j < C ? ts * load_as<A>(p.teacher, p.teacher_dtype, t0 + j) : A(0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const Index j = base + u * step;
      const A q = bv[u] == -INFINITY ? zero_q : exp_a((bv[u] - st.mb) - log_sb);
      if (j < C) g[j] = from_acc<TS, A>(ss * (exp_a((av[u] - st.ma) - log_sa) - q));
    }
  }
}

template <typename TS, typename A>
cudaError_t launch(const DenseSoftCEParams& p, cudaStream_t stream) {
  if (p.cols <= kWarpRowCols) {
    const int64_t blocks = (p.rows + kThreads / 32 - 1) / (kThreads / 32);
    if (blocks > 2147483647) return cudaErrorInvalidValue;
    VF_LAUNCH((dense_soft_ce_kernel<TS, A, false>), static_cast<unsigned>(blocks), kThreads, 0, stream, p);
  } else {
    if (p.rows > 2147483647) return cudaErrorInvalidValue;
    VF_LAUNCH((dense_soft_ce_kernel<TS, A, true>), static_cast<unsigned>(p.rows), kThreads,
              6 * (kThreads / 32) * sizeof(A), stream, p);
  }
  return cudaGetLastError();
}

template <typename A>
cudaError_t dispatch(const DenseSoftCEParams& p, cudaStream_t s) {
  switch (p.student_dtype) {
    case DType::kFloat16:
      return launch<__half, A>(p, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16, A>(p, s);
    case DType::kFloat32:
      return launch<float, A>(p, s);
    case DType::kFloat64:
      return launch<double, A>(p, s);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

int dense_soft_ce_cuda(const DenseSoftCEParams& p, void* stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return p.accumulate_double ? dispatch<double>(p, s) : dispatch<float>(p, s);
}

}  // namespace vitfast
