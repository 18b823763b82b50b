// Emulator binding of the window-attention CUDA kernels (see module.cpp).
#include <torch/extension.h>

#include "common/torch_glue.h"
#include "window_attention/window_attention_op.h"
#include "window_attention/window_attention_cuda.cu"
#include "window_attention/head_mix_cuda.cu"
#include "window_attention/head_mix_fwd_f16_cuda.cu"
#include "window_attention/head_mix_fwd_bf16_cuda.cu"
#include "window_attention/head_mix_fwd_f32_cuda.cu"
#include "window_attention/head_mix_fwd_f64_cuda.cu"
#include "window_attention/head_mix_bwd_f16_cuda.cu"
#include "window_attention/head_mix_bwd_bf16_cuda.cu"
#include "window_attention/head_mix_bwd_f32_cuda.cu"
#include "window_attention/head_mix_bwd_f64_cuda.cu"
#include "window_attention/head_mix_stream_bwd_f16_cuda.cu"
#include "window_attention/head_mix_stream_bwd_bf16_cuda.cu"
#include "window_attention/head_mix_stream_bwd_kv_f16_cuda.cu"
#include "window_attention/head_mix_stream_bwd_kv_bf16_cuda.cu"
#include "window_attention/head_mix_stream_bwd_h12_f16_cuda.cu"
#include "window_attention/head_mix_stream_bwd_h12_bf16_cuda.cu"
#include "window_attention/head_mix_split_bwd_f16_cuda.cu"
#include "window_attention/head_mix_split_bwd_bf16_cuda.cu"
#include "window_attention/head_mix_split_fwd_f16_cuda.cu"
#include "window_attention/head_mix_split_fwd_bf16_cuda.cu"

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

std::string route(const at::Tensor& qkv, int64_t heads, int64_t dk, int64_t dv, int64_t tokens) {
  vitfast::WindowAttentionParams p{};
  p.dtype = vitfast::to_kernel_dtype(qkv.scalar_type());
  p.heads = static_cast<int32_t>(heads);
  p.dim_k = static_cast<int32_t>(dk);
  p.dim_v = static_cast<int32_t>(dv);
  p.tokens = static_cast<int32_t>(tokens);
  return vitfast::window_attention_cuda_route(p);
}

}  // namespace

void register_window_attention(pybind11::module_& m) {
  m.def("window_attention_route", &route);
  m.def("window_attention_forward", &forward);
  m.def("window_attention_backward", &backward);
}

// ---------------------------------------------------------------------------------------------
// Head-mixing attention (head_mix_*.cuh), through its own glue (head_mix_op.cpp).
#include "common/torch_glue.h"
#include "window_attention/head_mix_op.h"

namespace {

using Opt = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> head_mix_forward(bool bias_buffer, const at::Tensor& qkv, const Opt& table,
                                                    const Opt& index, const Opt& mask, const Opt& pre,
                                                    const Opt& pre_bias, const Opt& post, const Opt& post_bias,
                                                    int64_t heads, int64_t dk, int64_t dv,
                                                    std::vector<int64_t> offsets, int64_t head_stride, double scale,
                                                    std::vector<int64_t> window, std::vector<int64_t> shift) {
  const WindowAttentionArgs args{qkv, table, index, mask, heads, dk, dv, offsets, head_stride, scale, window, shift};
  const vitfast::HeadMixArgs mix{pre, pre_bias, post, post_bias};
  WindowAttentionCall call = vitfast::prepare_head_mix_forward(args, mix);
  if (bias_buffer) vitfast::attach_head_mix_table_buffer(call);
  const int64_t ws = vitfast::head_mix_attention_forward_workspace(call.params.fwd);
  TORCH_CHECK(ws >= 0, "no forward configuration fits");
  const at::Tensor workspace = at::full({std::max<int64_t>(ws, 1)}, 1e30, call.lse.options());  // poison
  const int err = vitfast::head_mix_attention_forward_cuda(call.params.fwd, workspace.data_ptr(), nullptr);
  TORCH_CHECK(err == 0, "emulated head-mix forward failed with ", err);
  return {call.out, call.lse};
}

std::vector<at::Tensor> head_mix_backward(bool bias_buffer, const at::Tensor& grad_out, const at::Tensor& qkv,
                                          const at::Tensor& lse, const Opt& table, const Opt& index, const Opt& mask,
                                          const Opt& pre, const Opt& pre_bias, const Opt& post, const Opt& post_bias,
                                          int64_t heads, int64_t dk, int64_t dv, std::vector<int64_t> offsets,
                                          int64_t head_stride, double scale, std::vector<int64_t> window,
                                          std::vector<int64_t> shift) {
  const WindowAttentionArgs args{qkv, table, index, mask, heads, dk, dv, offsets, head_stride, scale, window, shift};
  const vitfast::HeadMixArgs mix{pre, pre_bias, post, post_bias};
  WindowAttentionCall call = vitfast::prepare_head_mix_backward(args, mix, grad_out, lse, true, true);
  if (bias_buffer) vitfast::attach_head_mix_table_buffer(call);
  const int64_t ws = vitfast::head_mix_attention_backward_workspace(call.params);
  TORCH_CHECK(ws >= 0, "no backward configuration fits");
  const at::Tensor workspace = at::full({std::max<int64_t>(ws, 1)}, 1e30, lse.options());  // poison
  const int err = vitfast::head_mix_attention_backward_cuda(call.params, workspace.data_ptr(), nullptr);
  TORCH_CHECK(err == 0, "emulated head-mix backward failed with ", err);
  auto [g_table, g_pre, g_post, g_post_bias] = vitfast::head_mix_param_grads(call, mix, /*table_grad_cuda=*/true, nullptr);
  return {call.grad_qkv, g_table, g_pre, g_post, g_post_bias};
}

// "registers" when the register kernels take these arguments (head_mix_reg.cuh), "stream" when
// the streaming forward and backward do (head_mix_stream*.cuh), "stream+tiles" when only the
// streaming forward does, else where the tile kernels keep their accumulators: "smem" or
// "global" per kernel.
std::string head_mix_routes(const at::Tensor& qkv, int64_t heads, int64_t dk, int64_t dv, int64_t tokens,
                            bool has_table, bool has_mask) {
  static char flag;
  vitfast::WindowAttentionBackwardParams b{};
  if (has_table) b.fwd.table = &flag;
  if (has_mask) b.fwd.mask = &flag;
  b.fwd.heads = static_cast<int32_t>(heads);
  b.fwd.dim_k = static_cast<int32_t>(dk);
  b.fwd.dim_v = static_cast<int32_t>(dv);
  b.fwd.tokens = static_cast<int32_t>(tokens);
  b.fwd.windows = qkv.size(0);
  b.fwd.dtype = vitfast::to_kernel_dtype(qkv.scalar_type());
  b.grad_pre_mix = reinterpret_cast<void*>(1);  // mixing gradients wanted
  const std::string route = vitfast::head_mix_attention_cuda_route(b.fwd);
  if (route == "registers" || route == "stream" || route == "stream+tiles") return route;
  auto where = [](bool smem) { return std::string(smem ? "smem" : "global"); };
  return vitfast::with_dtype(b.fwd.dtype, [&](auto t) {
    using T = decltype(t);
    using Acc = typename vitfast::wa::AccOf<T>::type;
    size_t smem = 0;
    const auto f = vitfast::plan_mix_fwd<T, Acc>(b.fwd, vitfast::device_smem_optin(), &smem);
    const auto plan = vitfast::plan_mix_bwd<T>(b);
    if (f.QC == 0 || !plan.ok()) return std::string("no launch configuration fits");
    return "fwd:" + where(f.o_smem) + ",bwd_q:" + where(plan.q.dq_smem) + ",bwd_kv:" + where(plan.k.acc_smem);
  });
}

}  // namespace

void register_head_mix_attention(pybind11::module_& m) {
  m.def("head_mix_routes", &head_mix_routes);
  m.def("head_mix_attention_forward", &head_mix_forward);
  m.def("head_mix_attention_backward", &head_mix_backward);
}
