// Host-side reads and writes of run-time-typed float arrays (torch-free), shared by the CPU kernels.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace vitfast {

// base[i] as Acc (float or double), base holding float16, bfloat16, float32 or float64.
template <typename Acc>
inline Acc host_load(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16:
      return static_cast<Acc>(half_bits_to_float(static_cast<const uint16_t*>(base)[i]));
    case DType::kBFloat16:
      return static_cast<Acc>(bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]));
    case DType::kFloat32:
      return static_cast<Acc>(static_cast<const float*>(base)[i]);
    default:
      return static_cast<Acc>(static_cast<const double*>(base)[i]);
  }
}

// base[i] = v rounded to dt (round to nearest even).
template <typename Acc>
inline void host_store(void* base, DType dt, int64_t i, Acc v) {
  switch (dt) {
    case DType::kFloat16:
      static_cast<uint16_t*>(base)[i] = float_to_half_bits(static_cast<float>(v));
      break;
    case DType::kBFloat16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(static_cast<float>(v));
      break;
    case DType::kFloat32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    default:
      static_cast<double*>(base)[i] = static_cast<double>(v);
  }
}

}  // namespace vitfast
