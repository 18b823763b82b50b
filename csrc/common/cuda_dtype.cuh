// Device-side reads of a run-time-typed float array (torch-free), shared by the CUDA kernels.
#pragma once

#include "cuda_compat.cuh"

#include <cstdint>

#include "dtype.h"

namespace vitfast {

// base[i] as Acc (float or double), base holding float16, bfloat16, float32 or float64.
template <typename Acc>
__device__ __forceinline__ Acc load_as(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16:
      return static_cast<Acc>(__half2float(static_cast<const __half*>(base)[i]));
    case DType::kBFloat16:
      return static_cast<Acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]));
    case DType::kFloat32:
      return static_cast<Acc>(static_cast<const float*>(base)[i]);
    default:
      return static_cast<Acc>(static_cast<const double*>(base)[i]);
  }
}

}  // namespace vitfast
