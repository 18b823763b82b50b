// Helpers for the ATen glue layer: argument checks that name the op and the argument, and the
// mapping from ATen dtypes to the kernels' torch-free DType.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "dtype.h"

namespace vitfast {

inline std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

inline DType to_kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kShort:
      return DType::kInt16;
    case at::kInt:
      return DType::kInt32;
    case at::kLong:
      return DType::kInt64;
    default:
      TORCH_CHECK_TYPE(false, "vitfast: dtype ", dtype_name(t), " has no kernel mapping");
  }
}

// "vitfast.<op>: argument '<arg>' <what>" as TypeError / ValueError / RuntimeError.
#define VF_CHECK_TYPE(cond, op, arg, ...) \
  TORCH_CHECK_TYPE(cond, "vitfast.", op, ": argument '", arg, "' ", __VA_ARGS__)
#define VF_CHECK_VALUE(cond, op, arg, ...) \
  TORCH_CHECK_VALUE(cond, "vitfast.", op, ": argument '", arg, "' ", __VA_ARGS__)

inline void check_dtype_in(const at::Tensor& t, std::initializer_list<at::ScalarType> allowed, const char* op,
                           const char* arg) {
  bool ok = false;
  std::string names;
  for (auto a : allowed) {
    ok |= t.scalar_type() == a;
    names += (names.empty() ? "" : ", ") + dtype_name(a);
  }
  VF_CHECK_TYPE(ok, op, arg, "must have dtype in {", names, "}, got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* arg_a,
                              const char* arg_b) {
  VF_CHECK_VALUE(a.device() == b.device(), op, arg_b, "must be on the same device as '", arg_a, "' (", a.device(),
                 "), got ", b.device());
}

// Kernels take unit stride along the last dim and any row stride; anything else is copied.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

}  // namespace vitfast
