// Run-time flags -> template parameters for the window-attention family's entry points.
// Included by the *_cuda.cu translation units (and together by the CUDA emulator binding).
#pragma once

#include <type_traits>

#include "../common/cuda_compat.cuh"
#include "window_attention.h"

namespace vitfast {
namespace {

// f(T{}) for the storage dtype: the run-time dtype becomes the kernels' template parameter
template <typename F>
auto with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kFloat32:
      return f(float{});
    default:
      return f(double{});
  }
}

// f(std::integral_constant<int, kCap>{}) for the head-mixing kernels' register arrays (kCap >= heads)
template <typename F>
auto with_heads_cap(int heads, F&& f) {
  if (heads <= 8) return f(std::integral_constant<int, 8>{});
  if (heads <= 16) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, kHeadMixMaxHeads>{});
}

}  // namespace
}  // namespace vitfast
