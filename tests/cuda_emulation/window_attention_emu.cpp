// Emulator binding of the window-attention CUDA kernels (see module.cpp).
#include <torch/extension.h>

#include "window_attention/window_attention_op.h"
#include "window_attention/window_attention_cuda.cu"

namespace {

using vitfast::WindowAttentionArgs;
using vitfast::WindowAttentionCall;

// bias_buffer: whether the kernels get the precomputed bias (as on the GPU) or gather it per score
std::tuple<at::Tensor, at::Tensor> forward(bool bias_buffer, const at::Tensor& qkv, const c10::optional<at::Tensor>& table,
                                           const c10::optional<at::Tensor>& index,
                                           const c10::optional<at::Tensor>& mask, int64_t heads, int64_t dk,
                                           int64_t dv, std::vector<int64_t> offsets, int64_t head_stride,
                                           double scale, std::vector<int64_t> window, std::vector<int64_t> shift) {
  const WindowAttentionArgs args{qkv, table, index, mask, heads, dk, dv, offsets, head_stride, scale, window, shift};
  WindowAttentionCall call = vitfast::prepare_window_attention_forward(args);
  if (bias_buffer) vitfast::attach_window_attention_bias_buffer(call);
  const int err = vitfast::window_attention_forward_cuda(call.params.fwd, nullptr);
  TORCH_CHECK(err == 0, "emulated forward failed with ", err);
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor> backward(bool bias_buffer, const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out,
                                            const at::Tensor& lse, const c10::optional<at::Tensor>& table,
                                            const c10::optional<at::Tensor>& index,
                                            const c10::optional<at::Tensor>& mask, int64_t heads, int64_t dk,
                                            int64_t dv, std::vector<int64_t> offsets, int64_t head_stride,
                                            double scale, std::vector<int64_t> window, std::vector<int64_t> shift) {
  const WindowAttentionArgs args{qkv, table, index, mask, heads, dk, dv, offsets, head_stride, scale, window, shift};
  WindowAttentionCall call = vitfast::prepare_window_attention_backward(args, grad_out, out, lse, true);
  if (bias_buffer) vitfast::attach_window_attention_bias_buffer(call);
  const int64_t ws = vitfast::window_attention_backward_workspace(call.params);
  TORCH_CHECK(ws >= 0, "no backward configuration fits");
  const at::Tensor workspace = at::full({std::max<int64_t>(ws, 1)}, 1e30, lse.options());  // poison
  const int err = vitfast::window_attention_backward_cuda(call.params, workspace.data_ptr(), nullptr);
  TORCH_CHECK(err == 0, "emulated backward failed with ", err);
  at::Tensor grad_table = vitfast::window_attention_table_grad(call, /*cuda_kernel=*/true);  // the CUDA segment-sum kernel
  return {call.grad_qkv, grad_table.defined() ? grad_table : at::empty({0})};
}

}  // namespace

void register_window_attention(pybind11::module_& m) {
  m.def("window_attention_forward", &forward);
  m.def("window_attention_backward", &backward);
}
