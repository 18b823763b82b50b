// Emulator binding of the sparse soft-target cross-entropy CUDA kernels (see module.cpp).
#include <torch/extension.h>

#include "soft_target_ce/soft_target_ce_op.h"
#include "soft_target_ce/soft_target_ce_cuda.cu"
#include "soft_target_ce/dense_soft_ce_op.h"
#include "soft_target_ce/dense_soft_ce_cuda.cu"

namespace {

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& values, const at::Tensor& indices,
                                           int64_t num_classes) {
  vitfast::SoftTargetCECall call = vitfast::prepare_soft_target_ce_forward(logits, values, indices, num_classes);
  const int err = vitfast::soft_target_ce_forward_cuda(call.params, nullptr);
  TORCH_CHECK(err == 0, "emulated soft-target CE forward failed with ", err);
  return {call.loss, call.lse};
}

at::Tensor backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& values,
                    const at::Tensor& indices, const at::Tensor& lse) {
  vitfast::SoftTargetCECall call = vitfast::prepare_soft_target_ce_backward(grad_loss, logits, values, indices, lse);
  const int err = vitfast::soft_target_ce_backward_cuda(call.params, nullptr);
  TORCH_CHECK(err == 0, "emulated soft-target CE backward failed with ", err);
  return call.grad_logits;
}

std::tuple<at::Tensor, at::Tensor> dense(const at::Tensor& student, const at::Tensor& teacher, double student_scale,
                                         double teacher_scale, bool want_grad) {
  vitfast::DenseSoftCECall call =
      vitfast::prepare_dense_soft_ce(student, teacher, student_scale, teacher_scale, want_grad);
  const int err = vitfast::dense_soft_ce_cuda(call.params, nullptr);
  TORCH_CHECK(err == 0, "emulated dense soft-target CE failed with ", err);
  return {call.loss, call.grad};
}

}  // namespace

void register_soft_target_ce(pybind11::module_& m) {
  m.def("soft_target_ce_forward", &forward);
  m.def("soft_target_ce_backward", &backward);
  m.def("dense_soft_target_ce", &dense);
}
