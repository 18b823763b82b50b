// Emulator binding of the top-k softmax CUDA kernel (see module.cpp).
#include <torch/extension.h>

#include "topk_softmax/topk_softmax_op.h"
#include "topk_softmax/topk_softmax_cuda.cu"

namespace {

std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor& logits, int64_t k, double temperature,
                                        std::optional<at::ScalarType> values_dtype) {
  vitfast::TopkSoftmaxCall call = vitfast::prepare_topk_softmax(logits, k, temperature, values_dtype);
  const int err = vitfast::topk_softmax_cuda(call.params, nullptr);
  TORCH_CHECK(err == 0, "emulated topk_softmax failed with ", err);
  return {call.values, call.indices};
}

}  // namespace

void register_topk_softmax(pybind11::module_& m) { m.def("topk_softmax", &topk); }
