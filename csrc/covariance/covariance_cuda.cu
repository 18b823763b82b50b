// Streaming covariance update on CUDA (see covariance.h for the maths).
//
// 1. chunk_mean_kernel: float64 column means of every row chunk (one read of Y).
// 2. new_mean_kernel: the mean after the update, from the old state and the chunk means.
// 3. gram_kernel: for each chunk and each upper-triangle 64x64 tile pair, the centred Gram in
//    fp32 FMAs, flushed into float64 registers every kFlushRows rows (so precision does not
//    depend on the batch size), then added to M2 with the Chan corrections by float64 atomics.
//    Chunks exist only to give small-m problems enough blocks.
// 4. The new mean is copied into the state.
// This is the SIMT version; a tensor-core (3xTF32 / bf16 mma) Gram is the next step.

#include <cstdint>

#include "../common/cuda_compat.cuh"
#include "../common/cuda_dtype.cuh"
#include "covariance.h"

namespace vitfast {
namespace {

constexpr int kTile = 64;       // output tile edge
constexpr int kK = 16;          // rows per smem stage
constexpr int kThreads = 256;   // 16 x 16 threads, 4 x 4 outputs each
constexpr int kFlushRows = 1024;

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

__global__ void __launch_bounds__(kThreads) gram_kernel(CovarianceParams p, int chunks, int tiles) {
  __shared__ __align__(16) float As[kK][kTile];
  __shared__ __align__(16) float Bs[kK][kTile];

  // Linear block index -> upper-triangle tile pair (ti <= tj), row by row.
  int rem = blockIdx.x, ti = 0;
  while (rem >= tiles - ti) {
    rem -= tiles - ti;
    ++ti;
  }
  const int tj = ti + rem;
  const int chunk = blockIdx.y;
  const int64_t i0 = static_cast<int64_t>(ti) * kTile, j0 = static_cast<int64_t>(tj) * kTile;
  const int64_t r0 = static_cast<int64_t>(chunk) * p.chunk_rows;
  const int64_t r1 = min(r0 + p.chunk_rows, p.rows);
  const double* mu_c = p.chunk_mean + static_cast<int64_t>(chunk) * p.m;

  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  // Loader: thread -> (row lk of the stage, 4 consecutive columns from lc).
  const int lk = tid >> 4, lc = (tid & 15) * 4;
  float mean_a[4], mean_b[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int64_t ca = i0 + lc + q, cb = j0 + lc + q;
    mean_a[q] = ca < p.m ? static_cast<float>(mu_c[ca]) : 0.0f;
    mean_b[q] = cb < p.m ? static_cast<float>(mu_c[cb]) : 0.0f;
  }

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

}  // namespace

int covariance_update_cuda(const CovarianceParams& p, void* stream) {
  if (p.rows == 0) return cudaSuccess;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int chunks = static_cast<int>((p.rows + p.chunk_rows - 1) / p.chunk_rows);
  const int tiles = static_cast<int>((p.m + kTile - 1) / kTile);
  const unsigned col_blocks32 = static_cast<unsigned>((p.m + 31) / 32);
  const unsigned col_blocks256 = static_cast<unsigned>((p.m + 255) / 256);
  VF_LAUNCH(chunk_mean_kernel, dim3(col_blocks32, chunks), dim3(32, 8), 0, s, p);
  VF_LAUNCH(new_mean_kernel, col_blocks256, 256, 0, s, p, chunks);
  const unsigned pairs = static_cast<unsigned>(tiles) * (tiles + 1) / 2;
  VF_LAUNCH(gram_kernel, dim3(pairs, chunks), kThreads, 0, s, p, chunks, tiles);
  VF_LAUNCH(copy_mean_kernel, col_blocks256, 256, 0, s, p, chunks);
  return cudaGetLastError();
}

}  // namespace vitfast
