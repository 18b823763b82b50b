// Autograd for vitfast::sparse_soft_target_ce_forward in C++, for every device: the loss is called
// once per training step on small tensors, where a Python autograd wrapper (torch.library's
// register_autograd) cost several times the op itself on the host (benchmarks/NOTES.md, CE host
// cost). The fake kernels stay in Python (vitfast/ops/soft_target_ce.py); torch.compile traces
// through this kernel like through torchvision's C++ autograd ops.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace vitfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& logits, const at::Tensor& values,
                                                const at::Tensor& indices, int64_t num_classes) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vitfast::sparse_soft_target_ce_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, int64_t)>();
  return op.call(logits, values, indices, num_classes);
}

at::Tensor call_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& values,
                         const at::Tensor& indices, const at::Tensor& lse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vitfast::sparse_soft_target_ce_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(grad_loss, logits, values, indices, lse);
}

class SoftTargetCE : public torch::autograd::Function<SoftTargetCE> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& values,
                               const at::Tensor& indices, int64_t num_classes) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [loss, lse] = call_forward(logits, values, indices, num_classes);
    ctx->save_for_backward({logits, values, indices, lse});
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor grad;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      grad = call_backward(grads[0], saved[0], saved[1], saved[2], saved[3]);
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> forward_autograd(const at::Tensor& logits, const at::Tensor& values,
                                                    const at::Tensor& indices, int64_t num_classes) {
  const variable_list out = SoftTargetCE::apply(logits, values, indices, num_classes);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, Autograd, m) {
  m.impl("sparse_soft_target_ce_forward", &forward_autograd);
}

}  // namespace vitfast
