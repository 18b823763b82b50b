// vitfast::topk_softmax: argument checks, allocation and the CPU implementation.
#include "topk_softmax_op.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../common/torch_glue.h"

namespace vitfast {

TopkSoftmaxCall prepare_topk_softmax(const at::Tensor& logits, int64_t k, double temperature,
                                     std::optional<at::ScalarType> values_dtype) {
  constexpr const char* op = "topk_softmax";
  VF_CHECK_VALUE(logits.dim() == 2, op, "logits", "must be 2-D (rows, classes), got shape ", logits.sizes());
  check_dtype_in(logits, {at::kHalf, at::kBFloat16, at::kFloat}, op, "logits");
  const int64_t C = logits.size(1);
  VF_CHECK_VALUE(C >= 1 && C <= std::numeric_limits<int32_t>::max(), op, "logits",
                 "must have between 1 and 2^31-1 classes, got ", C);
  VF_CHECK_VALUE(k >= 1 && k <= C && k <= kTopkMaxK, op, "k", "must be in [1, min(classes, ", kTopkMaxK,
                 ")] = [1, ", std::min<int64_t>(C, kTopkMaxK), "], got ", k);
  VF_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op, "temperature",
                 "must be finite and > 0, got ", temperature);
  VF_CHECK_VALUE(std::isfinite(static_cast<float>(1.0 / temperature)), op, "temperature",
                 "must be at least ~3e-39 (1 / temperature must fit a float32), got ", temperature);
  const at::ScalarType vdt = values_dtype.value_or(at::kHalf);
  VF_CHECK_TYPE(vdt == at::kHalf || vdt == at::kFloat, op, "values_dtype", "must be torch.float16 or torch.float32, got ",
                dtype_name(vdt));

  TopkSoftmaxCall call;
  call.logits = rows_unit_stride(logits);
  // int16 indices when every class index fits: the TinyViT store keeps them per sample-epoch.
  const at::ScalarType idt = C <= 32768 ? at::kShort : at::kInt;
  const int64_t rows = logits.size(0);
  call.values = at::empty({rows, k}, logits.options().dtype(vdt));
  call.indices = at::empty({rows, k}, logits.options().dtype(idt));

  TopkSoftmaxParams& p = call.params;
  p.logits = call.logits.data_ptr();
  p.logits_dtype = to_kernel_dtype(logits.scalar_type());
  p.rows = rows;
  p.cols = C;
  p.row_stride = rows > 1 ? call.logits.stride(0) : C;
  p.k = static_cast<int32_t>(k);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.values = call.values.data_ptr();
  p.values_dtype = to_kernel_dtype(vdt);
  p.indices = call.indices.data_ptr();
  p.indices_dtype = to_kernel_dtype(idt);
  return call;
}

// VITFAST_NO_REGISTRATION: the glue alone, for the CUDA emulator's test binding
#ifndef VITFAST_NO_REGISTRATION
namespace {

std::tuple<at::Tensor, at::Tensor> topk_softmax_cpu(const at::Tensor& logits, int64_t k, double temperature,
                                                    std::optional<at::ScalarType> values_dtype) {
  TopkSoftmaxCall call = prepare_topk_softmax(logits, k, temperature, values_dtype);
  const TopkSoftmaxParams p = call.params;
  at::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) { topk_softmax_cpu_rows(p, begin, end); });
  return {call.values, call.indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) { m.impl("topk_softmax", &topk_softmax_cpu); }
#endif  // VITFAST_NO_REGISTRATION

}  // namespace vitfast
