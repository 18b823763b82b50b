// Streaming covariance update on CUDA (see covariance.h for the maths).
//
// 1. chunk_mean_kernel: float64 column means of every row chunk (one read of Y).
// 2. new_mean_kernel: the mean after the update, from the old state and the chunk means.
// 3. gram_tc_kernel (sm_80+): for each chunk and each upper-triangle 64x64 tile pair, the centred
//    Gram on tensor cores in 3xTF32 (each centred fp32 value split into tf32 hi + lo parts;
//    hi*hi + hi*lo + lo*hi keeps fp32-level products), fp32 accumulators flushed into float64
//    every kFlushRows rows (so precision does not depend on the batch size), then added to M2
//    with the Chan corrections by float64 atomics. gram_kernel is the SIMT version of the same
//    (older GPUs). Chunks exist only to give small-m problems enough blocks.
// 4. The new mean is copied into the state.
// The split-GEMM route (covariance.h) shares steps 1, 2 and 4 and replaces step 3 by bf16 planes,
// two external GEMMs per chunk and a float64 flush.

#include <algorithm>
#include <cstdint>

#include "../common/cuda_compat.cuh"
#include "../common/cuda_dtype.cuh"
#include "covariance.h"

namespace vitfast {
namespace {

constexpr int kTile = 64;       // output tile edge
constexpr int kK = 16;          // rows per smem stage
constexpr int kThreads = 256;   // 16 x 16 threads, 4 x 4 outputs each
// fp32 partials -> float64 every kFlushRows rows: the tensor cores' truncating accumulation is a
// biased error, ~5e-6 at 512 rows and ~1e-5 at 1,024 on the bar's data in
// benchmarks/covariance_accumulation_model.py (3xTF32, no guard bits)
constexpr int kFlushRows = 256;

__global__ void chunk_mean_kernel(CovarianceParams p) {
  __shared__ double part[8][33];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * p.chunk_rows;
  const int64_t r1 = min(r0 + p.chunk_rows, p.rows);
  double s = 0.0;
  if (col < p.m) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) s += load_as<float>(p.y, p.y_dtype, r * p.row_stride + col);
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < p.m) {
    double t = 0.0;
    for (int i = 0; i < 8; ++i) t += part[i][threadIdx.x];
    p.chunk_mean[blockIdx.y * p.m + col] = t / static_cast<double>(r1 - r0);
  }
}

// New mean -> scratch row `chunks` of chunk_mean.
__global__ void new_mean_kernel(CovarianceParams p, int chunks) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p.m) return;
  double s = *p.count * p.mean[col];
  for (int c = 0; c < chunks; ++c) {
    const int64_t nc = min(p.chunk_rows, p.rows - c * p.chunk_rows);
    s += static_cast<double>(nc) * p.chunk_mean[c * p.m + col];
  }
  p.chunk_mean[chunks * p.m + col] = s / (*p.count + static_cast<double>(p.rows));
}

__global__ void copy_mean_kernel(CovarianceParams p, int chunks) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col < p.m) p.mean[col] = p.chunk_mean[chunks * p.m + col];
  if (col == 0) *p.count += static_cast<double>(p.rows);  // every reader of count ran before
}

// What a Gram block works on: blockIdx.x -> upper-triangle tile pair (ti <= tj, row by row),
// blockIdx.y -> row chunk.
struct GramBlock {
  int chunk;
  int64_t i0, j0;      // first column of the i- and j-tiles
  int64_t r0, r1;      // the chunk's rows
  const double* mu_c;  // the chunk's column means
};

__device__ __forceinline__ GramBlock gram_block(const CovarianceParams& p, int tiles) {
  int rem = blockIdx.x, ti = 0;
  while (rem >= tiles - ti) {
    rem -= tiles - ti;
    ++ti;
  }
  GramBlock g;
  g.chunk = blockIdx.y;
  g.i0 = static_cast<int64_t>(ti) * kTile;
  g.j0 = static_cast<int64_t>(ti + rem) * kTile;
  g.r0 = static_cast<int64_t>(g.chunk) * p.chunk_rows;
  g.r1 = min(g.r0 + p.chunk_rows, p.rows);
  g.mu_c = p.chunk_mean + static_cast<int64_t>(g.chunk) * p.m;
  return g;
}

// The chunk means of columns [c0, c0 + N) as float, 0 past m (what centring subtracts).
template <int N>
__device__ __forceinline__ void load_means(const CovarianceParams& p, const double* mu_c, int64_t c0, float out[N]) {
#pragma unroll
  for (int q = 0; q < N; ++q) out[q] = c0 + q < p.m ? static_cast<float>(mu_c[c0 + q]) : 0.0f;
}

__global__ void __launch_bounds__(kThreads) gram_kernel(CovarianceParams p, int chunks, int tiles) {
  __shared__ __align__(16) float As[kK][kTile];
  __shared__ __align__(16) float Bs[kK][kTile];

  const GramBlock g = gram_block(p, tiles);
  const int chunk = g.chunk;
  const int64_t i0 = g.i0, j0 = g.j0, r0 = g.r0, r1 = g.r1;
  const double* mu_c = g.mu_c;

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  // Loader: thread -> (row lk of the stage, 4 consecutive columns from lc).
  const int lk = tid >> 4, lc = (tid & 15) * 4;
  float mean_a[4], mean_b[4];
  load_means<4>(p, mu_c, i0 + lc, mean_a);
  load_means<4>(p, mu_c, j0 + lc, mean_b);

  float acc[4][4] = {};
  double acc64[4][4] = {};
  int since_flush = 0;
  for (int64_t k0 = r0; k0 < r1; k0 += kK) {
    const int64_t r = k0 + lk;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t ca = i0 + lc + q, cb = j0 + lc + q;
      // Rows past the chunk and columns past m contribute exactly zero.
      As[lk][lc + q] = (r < r1 && ca < p.m) ? load_as<float>(p.y, p.y_dtype, r * p.row_stride + ca) - mean_a[q] : 0.0f;
      Bs[lk][lc + q] = (r < r1 && cb < p.m) ? load_as<float>(p.y, p.y_dtype, r * p.row_stride + cb) - mean_b[q] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fmaf(av[u], bv[v], acc[u][v]);
      }
    }
    __syncthreads();
    since_flush += kK;
    if (since_flush >= kFlushRows) {  // keep each fp32 partial sum short
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          acc64[u][v] += acc[u][v];
          acc[u][v] = 0.0f;
        }
      }
      since_flush = 0;
    }
  }

  // Epilogue: M2 += G_c + n_c dmu_c dmu_c^T (+ n dmu_old dmu_old^T once, from chunk 0).
  const double* mu_new = p.chunk_mean + static_cast<int64_t>(chunks) * p.m;
  const double nc = static_cast<double>(r1 - r0);
  const double n_old = *p.count;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t i = i0 + ty * 4 + u;
    if (i >= p.m) continue;
    const double dci = mu_c[i] - mu_new[i];
    const double doi = p.mean[i] - mu_new[i];
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int64_t j = j0 + tx * 4 + v;
      if (j >= p.m || j < i) continue;  // upper triangle only
      double add = acc64[u][v] + static_cast<double>(acc[u][v]) + nc * dci * (mu_c[j] - mu_new[j]);
      if (chunk == 0 && n_old > 0) add += n_old * doi * (p.mean[j] - mu_new[j]);
      atomicAdd(p.m2 + i * p.m + j, add);
    }
  }
}


// y[row, col .. col + 8) as float, zero past m. kVec: 16-byte loads (the host checked that
// the pointer and the row stride allow them for this dtype).
template <bool kVec>
__device__ __forceinline__ void load8(const CovarianceParams& p, int64_t row, int64_t col, float out[8]) {
  const int64_t base = row * p.row_stride + col;
  if (kVec && col + 8 <= p.m) {
    if (p.y_dtype == DType::kFloat32) {
      const float4 u0 = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(p.y) + base));
      const float4 u1 = __ldg(reinterpret_cast<const float4*>(static_cast<const float*>(p.y) + base) + 1);
      out[0] = u0.x, out[1] = u0.y, out[2] = u0.z, out[3] = u0.w;
      out[4] = u1.x, out[5] = u1.y, out[6] = u1.z, out[7] = u1.w;
    } else {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p.y) + base));
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // little endian: element 2q in the low half
        out[2 * q] = load_as<float>(&w[q], p.y_dtype, 0);
        out[2 * q + 1] = load_as<float>(reinterpret_cast<const uint16_t*>(&w[q]) + 1, p.y_dtype, 0);
      }
    }
    return;
  }
#pragma unroll
  for (int q = 0; q < 8; ++q) out[q] = col + q < p.m ? load_as<float>(p.y, p.y_dtype, base + q) : 0.0f;
}

constexpr int kTcThreads = 128;  // 4 warps, each a 32 x 32 quarter of the 64 x 64 tile
constexpr int kTcRows = 16;      // rows per shared-memory stage (two k-steps of 8)
constexpr int kTcLd = kTile + 8;  // 72 floats: 32-byte aligned WMMA rows, fewer bank conflicts
constexpr int kScratchLd = 36;

template <bool kVec>
__global__ void __launch_bounds__(kTcThreads) gram_tc_kernel(CovarianceParams p, int chunks, int tiles) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  namespace wmma = nvcuda::wmma;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  // centred rows of the i-tile (a) and j-tile (b), split into tf32 hi and lo parts
  __shared__ __align__(128) float a_hi[kTcRows][kTcLd], a_lo[kTcRows][kTcLd];
  __shared__ __align__(128) float b_hi[kTcRows][kTcLd], b_lo[kTcRows][kTcLd];
  __shared__ __align__(128) float scratch[kTcThreads / 32][32][kScratchLd];

  const GramBlock g = gram_block(p, tiles);
  const int chunk = g.chunk;
  const int64_t i0 = g.i0, j0 = g.j0, r0 = g.r0, r1 = g.r1;
  const double* mu_c = g.mu_c;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wi = warp >> 1, wj = warp & 1;  // this warp's quarter of the output tile
  // Loader: thread -> (row lk of the stage, 8 consecutive columns from lc) of both tiles.
  const int lk = tid >> 3, lc = (tid & 7) * 8;
  float mean_a[8], mean_b[8];
  load_means<8>(p, mu_c, i0 + lc, mean_a);
  load_means<8>(p, mu_c, j0 + lc, mean_b);

  FragC acc[2][2];
#pragma unroll
  for (int fi = 0; fi < 2; ++fi)
#pragma unroll
    for (int fj = 0; fj < 2; ++fj) wmma::fill_fragment(acc[fi][fj], 0.0f);
  double acc64[32] = {};  // lane owns column `lane` of the warp's 32 x 32 quarter, rows 0..31

  auto flush = [&]() {
#pragma unroll
    for (int fi = 0; fi < 2; ++fi)
#pragma unroll
      for (int fj = 0; fj < 2; ++fj) {
        wmma::store_matrix_sync(&scratch[warp][fi * 16][fj * 16], acc[fi][fj], kScratchLd, wmma::mem_row_major);
        wmma::fill_fragment(acc[fi][fj], 0.0f);
      }
    __syncwarp();
#pragma unroll
    for (int q = 0; q < 32; ++q) acc64[q] += scratch[warp][q][lane];
    __syncwarp();
  };

  int since_flush = 0;
  for (int64_t k0 = r0; k0 < r1; k0 += kTcRows) {
    const int64_t r = k0 + lk;
    float ya[8] = {}, yb[8] = {};
    if (r < r1) {
      load8<kVec>(p, r, i0 + lc, ya);
      load8<kVec>(p, r, j0 + lc, yb);
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int64_t ca = i0 + lc + q, cb = j0 + lc + q;
      // Rows past the chunk and columns past m contribute exactly zero.
      const float va = (r < r1 && ca < p.m) ? ya[q] - mean_a[q] : 0.0f;
      const float vb = (r < r1 && cb < p.m) ? yb[q] - mean_b[q] : 0.0f;
      const float ha = wmma::__float_to_tf32(va), hb = wmma::__float_to_tf32(vb);
      a_hi[lk][lc + q] = ha;
      a_lo[lk][lc + q] = wmma::__float_to_tf32(va - ha);
      b_hi[lk][lc + q] = hb;
      b_lo[lk][lc + q] = wmma::__float_to_tf32(vb - hb);
    }
    __syncthreads();
#pragma unroll
    for (int k8 = 0; k8 < kTcRows; k8 += 8) {
      FragA ah[2], al[2];
      FragB bh[2], bl[2];
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        // A^T: element (i, r) = a[r][i] -> col-major with ld kTcLd; B: (r, j) = b[r][j] row-major
        wmma::load_matrix_sync(ah[f], &a_hi[k8][wi * 32 + f * 16], kTcLd);
        wmma::load_matrix_sync(al[f], &a_lo[k8][wi * 32 + f * 16], kTcLd);
        wmma::load_matrix_sync(bh[f], &b_hi[k8][wj * 32 + f * 16], kTcLd);
        wmma::load_matrix_sync(bl[f], &b_lo[k8][wj * 32 + f * 16], kTcLd);
      }
#pragma unroll
      for (int fi = 0; fi < 2; ++fi)
#pragma unroll
        for (int fj = 0; fj < 2; ++fj) {  // small terms first
          wmma::mma_sync(acc[fi][fj], al[fi], bh[fj], acc[fi][fj]);
          wmma::mma_sync(acc[fi][fj], ah[fi], bl[fj], acc[fi][fj]);
          wmma::mma_sync(acc[fi][fj], ah[fi], bh[fj], acc[fi][fj]);
        }
    }
    __syncthreads();
    since_flush += kTcRows;
    if (since_flush >= kFlushRows) {  // keep each fp32 partial sum short
      flush();
      since_flush = 0;
    }
  }
  flush();

  // Epilogue: M2 += G_c + n_c dmu_c dmu_c^T (+ n dmu_old dmu_old^T once, from chunk 0).
  const double* mu_new = p.chunk_mean + static_cast<int64_t>(chunks) * p.m;
  const double nc = static_cast<double>(r1 - r0);
  const double n_old = *p.count;
  const int64_t j = j0 + wj * 32 + lane;
  if (j >= p.m) return;
  const double dcj = mu_c[j] - mu_new[j], doj = p.mean[j] - mu_new[j];
#pragma unroll
  for (int q = 0; q < 32; ++q) {
    const int64_t i = i0 + wi * 32 + q;
    if (i >= p.m || j < i) continue;  // upper triangle only
    double add = acc64[q] + nc * (mu_c[i] - mu_new[i]) * dcj;
    if (chunk == 0 && n_old > 0) add += n_old * (p.mean[i] - mu_new[i]) * doj;
    atomicAdd(p.m2 + i * p.m + j, add);
  }
#else
  __trap();  // launched only on sm_80+
#endif
}

// ---- split-GEMM route -------------------------------------------------------------------------

int num_chunks(const CovarianceParams& p) { return static_cast<int>((p.rows + p.chunk_rows - 1) / p.chunk_rows); }

constexpr int kSplitThreads = 256;

// Chunk rows -> centred bf16 planes [b1; b0; b2] (plane stride n_c * m). Coalesced along columns;
// memory-bound (4 + 2 * planes bytes per fp32 element).
__global__ void __launch_bounds__(kSplitThreads) split_kernel(CovarianceParams p, int chunk, int planes,
                                                              __nv_bfloat16* out) {
  const int64_t r0 = static_cast<int64_t>(chunk) * p.chunk_rows;
  const int64_t nc = min(p.chunk_rows, p.rows - r0);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSplitThreads + threadIdx.x;
  if (col >= p.m) return;
  const float mu = static_cast<float>(p.chunk_mean[static_cast<int64_t>(chunk) * p.m + col]);
  const int64_t plane = nc * p.m;
  for (int64_t r = blockIdx.y; r < nc; r += gridDim.y) {
    const float c = load_as<float>(p.y, p.y_dtype, (r0 + r) * p.row_stride + col) - mu;
    const __nv_bfloat16 b0 = __float2bfloat16_rn(c);
    const float rest = c - __bfloat162float(b0);  // exact in fp32
    const __nv_bfloat16 b1 = __float2bfloat16_rn(rest);
    const int64_t e = r * p.m + col;
    out[e] = b1;
    out[plane + e] = b0;
    if (planes == 3) out[2 * plane + e] = __float2bfloat16_rn(rest - __bfloat162float(b1));
  }
}

constexpr int kFlushTile = 32;  // 32 x 32 output tiles, 32 x 8 threads

// M2[i][j] += P[i][j] + X[i][j] + X[j][i] + n_c dmu_c,i dmu_c,j (+ the old state's term from
// chunk 0) for i <= j. X[j][i] is read through a shared-memory transpose (coalesced both ways).
// One chunk per launch, so plain read-modify-writes suffice.
__global__ void flush_kernel(CovarianceParams p, int chunk, int chunks, int tiles, const float* P, const float* X) {
  __shared__ float xt[kFlushTile][kFlushTile + 1];
  int rem = blockIdx.x, ti = 0;
  while (rem >= tiles - ti) {
    rem -= tiles - ti;
    ++ti;
  }
  const int64_t i0 = static_cast<int64_t>(ti) * kFlushTile, j0 = static_cast<int64_t>(ti + rem) * kFlushTile;
  const int tx = threadIdx.x;
  for (int a = threadIdx.y; a < kFlushTile; a += blockDim.y) {  // xt[a][b] = X[j0 + a][i0 + b]
    const int64_t j = j0 + a, i = i0 + tx;
    xt[a][tx] = (j < p.m && i < p.m) ? X[j * p.m + i] : 0.0f;
  }
  __syncthreads();
  const double* mu_c = p.chunk_mean + static_cast<int64_t>(chunk) * p.m;
  const double* mu_new = p.chunk_mean + static_cast<int64_t>(chunks) * p.m;
  const double nc = static_cast<double>(min(p.chunk_rows, p.rows - static_cast<int64_t>(chunk) * p.chunk_rows));
  const double n_old = *p.count;
  const int64_t j = j0 + tx;
  if (j >= p.m) return;
  const double dcj = mu_c[j] - mu_new[j], doj = p.mean[j] - mu_new[j];
  for (int a = threadIdx.y; a < kFlushTile; a += blockDim.y) {
    const int64_t i = i0 + a;
    if (i >= p.m || j < i) continue;
    const int64_t e = i * p.m + j;
    double add = static_cast<double>(P[e]) + static_cast<double>(X[e]) + static_cast<double>(xt[tx][a]) +
                 nc * (mu_c[i] - mu_new[i]) * dcj;
    if (chunk == 0 && n_old > 0) add += n_old * (p.mean[i] - mu_new[i]) * doj;
    p.m2[e] += add;
  }
}

void launch_means(const CovarianceParams& p, cudaStream_t s) {
  const unsigned col_blocks32 = static_cast<unsigned>((p.m + 31) / 32);
  const unsigned col_blocks256 = static_cast<unsigned>((p.m + 255) / 256);
  VF_LAUNCH(chunk_mean_kernel, dim3(col_blocks32, num_chunks(p)), dim3(32, 8), 0, s, p);
  VF_LAUNCH(new_mean_kernel, col_blocks256, 256, 0, s, p, num_chunks(p));
}

void launch_finish(const CovarianceParams& p, cudaStream_t s) {
  VF_LAUNCH(copy_mean_kernel, static_cast<unsigned>((p.m + 255) / 256), 256, 0, s, p, num_chunks(p));
}

}  // namespace

int covariance_update_cuda(const CovarianceParams& p, bool tensor_cores, void* stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int chunks = num_chunks(p);
  const int tiles = static_cast<int>((p.m + kTile - 1) / kTile);
  launch_means(p, s);
  const unsigned pairs = static_cast<unsigned>(tiles) * (tiles + 1) / 2;
  if (tensor_cores) {
    const size_t elem = p.y_dtype == DType::kFloat32 ? 4 : 2;
    const bool vec = reinterpret_cast<uintptr_t>(p.y) % 16 == 0 && (p.row_stride * elem) % 16 == 0;
    auto kernel = vec ? gram_tc_kernel<true> : gram_tc_kernel<false>;
    VF_LAUNCH(kernel, dim3(pairs, chunks), kTcThreads, 0, s, p, chunks, tiles);
  } else {
    VF_LAUNCH(gram_kernel, dim3(pairs, chunks), kThreads, 0, s, p, chunks, tiles);
  }
  launch_finish(p, s);
  return cudaGetLastError();
}

int covariance_means_cuda(const CovarianceParams& p, void* stream) {
  launch_means(p, static_cast<cudaStream_t>(stream));
  return cudaGetLastError();
}

int covariance_split_cuda(const CovarianceParams& p, int chunk, int planes, uint16_t* out, void* stream) {
  const int64_t nc = std::min(p.chunk_rows, p.rows - static_cast<int64_t>(chunk) * p.chunk_rows);
  // ~8 rows per block: enough blocks at m = 3072 (12 x 512 for a 4,096-row chunk), fewer launches of
  // tiny blocks at small m
  const dim3 grid(static_cast<unsigned>((p.m + kSplitThreads - 1) / kSplitThreads),
                  static_cast<unsigned>(std::min<int64_t>((nc + 7) / 8, 65535)));
  VF_LAUNCH(split_kernel, grid, kSplitThreads, 0, static_cast<cudaStream_t>(stream), p, chunk, planes,
            reinterpret_cast<__nv_bfloat16*>(out));
  return cudaGetLastError();
}

int covariance_flush_cuda(const CovarianceParams& p, int chunk, const float* P, const float* X, void* stream) {
  const int tiles = static_cast<int>((p.m + kFlushTile - 1) / kFlushTile);
  const unsigned pairs = static_cast<unsigned>(tiles) * (tiles + 1) / 2;
  VF_LAUNCH(flush_kernel, pairs, dim3(kFlushTile, 8), 0, static_cast<cudaStream_t>(stream), p, chunk,
            num_chunks(p), tiles, P, X);
  return cudaGetLastError();
}

int covariance_finish_cuda(const CovarianceParams& p, void* stream) {
  launch_finish(p, static_cast<cudaStream_t>(stream));
  return cudaGetLastError();
}

}  // namespace vitfast
