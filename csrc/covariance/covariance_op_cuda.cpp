// vitfast::covariance_update_ on CUDA tensors.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/torch_glue.h"
#include "covariance.h"
#include "covariance_op.h"

namespace vitfast {
namespace {

void covariance_update_cuda_impl(at::Tensor count, at::Tensor mean, at::Tensor m2, const at::Tensor& y_in) {
  const c10::cuda::CUDAGuard guard(y_in.device());
  const at::Tensor y = check_covariance_args(count, mean, m2, y_in, /*cuda=*/true);
  const int64_t rows = y.size(0), m = y.size(1);
  if (rows == 0) return;
  // Row chunks only to give small-m problems enough blocks: aim for ~4 blocks per SM.
  const int64_t tiles = (m + 63) / 64, pairs = tiles * (tiles + 1) / 2;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((4 * sms + pairs - 1) / pairs, (rows + 1023) / 1024));
  chunks = std::min<int64_t>(chunks, 65535);
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  chunks = (rows + chunk_rows - 1) / chunk_rows;
  at::Tensor scratch = at::empty({chunks + 1, m}, mean.options());

  CovarianceParams p{};
  p.y = y.data_ptr();
  p.y_dtype = to_kernel_dtype(y.scalar_type());
  p.rows = rows;
  p.m = m;
  p.row_stride = rows > 1 ? y.stride(0) : m;
  p.chunk_rows = chunk_rows;
  p.chunk_mean = scratch.data_ptr<double>();
  p.mean = mean.data_ptr<double>();
  p.m2 = m2.data_ptr<double>();
  p.count = count.data_ptr<double>();
  C10_CUDA_CHECK(static_cast<cudaError_t>(covariance_update_cuda(p, at::cuda::getCurrentCUDAStream().stream())));
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) { m.impl("covariance_update_", &covariance_update_cuda_impl); }

}  // namespace vitfast
