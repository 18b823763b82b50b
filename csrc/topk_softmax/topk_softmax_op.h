// Glue shared by the CPU and CUDA registrations of vitfast::topk_softmax.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "topk_softmax.h"

namespace vitfast {

struct TopkSoftmaxCall {
  at::Tensor logits;  // unit stride along classes
  at::Tensor values;
  at::Tensor indices;
  TopkSoftmaxParams params;
};

// Validates every argument (errors name it) and allocates the outputs.
TopkSoftmaxCall prepare_topk_softmax(const at::Tensor& logits, int64_t k, double temperature,
                                     std::optional<at::ScalarType> values_dtype);

}  // namespace vitfast
