// vitfast::head_mix_attention_{forward,backward}: argument checks, allocation, CPU impl.
#include "head_mix_op.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/torch_glue.h"

namespace vitfast {
namespace {

constexpr const char* kOp = "head_mix_attention";

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The transform the kernels read: the parameter in the accumulation dtype, contiguous, or the
// identity (matrix) / zeros (bias) when absent.
at::Tensor mix_operand(const c10::optional<at::Tensor>& t, const at::Tensor& qkv, int64_t heads, bool matrix,
                       const char* arg) {
  const auto opts = qkv.options().dtype(acc_type(qkv));
  if (!t.has_value()) return matrix ? at::eye(heads, opts) : at::zeros({heads}, opts);
  const at::Tensor& x = *t;
  check_dtype_in(x, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, kOp, arg);
  check_same_device(qkv, x, kOp, "qkv", arg);
  if (matrix) {
    VF_CHECK_VALUE(x.dim() == 2 && x.size(0) == heads && x.size(1) == heads, kOp, arg, "must be (num_heads, num_heads) = (",
                   heads, ", ", heads, "), got ", x.sizes());
  } else {
    VF_CHECK_VALUE(x.dim() == 1 && x.size(0) == heads, kOp, arg, "must be (num_heads,) = (", heads, ",), got ",
                   x.sizes());
  }
  return x.to(acc_type(qkv)).contiguous();
}

void attach_mix(WindowAttentionCall& call, const WindowAttentionArgs& a, const HeadMixArgs& mix) {
  VF_CHECK_VALUE(a.num_heads <= kHeadMixMaxHeads, kOp, "num_heads", "must be at most ", kHeadMixMaxHeads,
                 " for head mixing, got ", a.num_heads);
  call.pre_mix = mix_operand(mix.pre_mix, a.qkv, a.num_heads, true, "pre_mix");
  mix_operand(mix.pre_mix_bias, a.qkv, a.num_heads, false, "pre_mix_bias");  // checked; no effect on the output
  call.post_mix = mix_operand(mix.post_mix, a.qkv, a.num_heads, true, "post_mix");
  call.post_mix_bias = mix_operand(mix.post_mix_bias, a.qkv, a.num_heads, false, "post_mix_bias");
  WindowAttentionParams& p = call.params.fwd;
  p.pre_mix = call.pre_mix.data_ptr();
  p.post_mix = call.post_mix.data_ptr();
  p.post_mix_bias = call.post_mix_bias.data_ptr();
}

WindowAttentionArgs named(const WindowAttentionArgs& a) {
  WindowAttentionArgs b = a;
  b.op = kOp;
  return b;
}

at::Tensor grad_like(const at::Tensor& acc_grad, const c10::optional<at::Tensor>& param) {
  if (!acc_grad.defined() || !param.has_value()) return at::empty({0}, acc_grad.defined() ? acc_grad.options() : at::TensorOptions());
  // a fresh tensor each: the accumulation buffers are views of one allocation, and outputs of an
  // op must not alias each other
  return acc_grad.to(param->scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

}  // namespace

WindowAttentionCall prepare_head_mix_forward(const WindowAttentionArgs& a, const HeadMixArgs& mix) {
  WindowAttentionCall call = prepare_window_attention_forward(named(a));
  attach_mix(call, a, mix);
  return call;
}

WindowAttentionCall prepare_head_mix_backward(const WindowAttentionArgs& a, const HeadMixArgs& mix,
                                              const at::Tensor& grad_out, const at::Tensor& lse, bool table_grad,
                                              bool mix_grad) {
  WindowAttentionCall call = prepare_window_attention_backward(named(a), grad_out, at::Tensor(), lse, table_grad);
  attach_mix(call, a, mix);
  if (mix_grad) {  // one buffer, [pre | post | post_bias]: the CUDA reduction writes it whole
    const int64_t H = a.num_heads;
    const at::Tensor all = at::zeros({2 * H * H + H}, a.qkv.options().dtype(acc_type(a.qkv)));
    call.grad_pre_mix = all.narrow(0, 0, H * H).view({H, H});
    call.grad_post_mix = all.narrow(0, H * H, H * H).view({H, H});
    call.grad_post_mix_bias = all.narrow(0, 2 * H * H, H);
    call.params.grad_pre_mix = call.grad_pre_mix.data_ptr();
    call.params.grad_post_mix = call.grad_post_mix.data_ptr();
    call.params.grad_post_mix_bias = call.grad_post_mix_bias.data_ptr();
  }
  return call;
}

void attach_head_mix_table_buffer(WindowAttentionCall& call) {
  WindowAttentionParams& p = call.params.fwd;
  if (p.table == nullptr) return;
  const int64_t elements = static_cast<int64_t>(p.heads) * p.tokens * p.tokens;
  const at::ScalarType acc = p.dtype == DType::kFloat64 ? at::kDouble : at::kFloat;
  if (elements * c10::elementSize(acc) > (int64_t{64} << 20)) return;
  call.bias_buffer = at::empty({elements}, call.qkv.options().dtype(acc));
  p.bias_buffer = call.bias_buffer.data_ptr();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_mix_param_grads(const WindowAttentionCall& call,
                                                                                const HeadMixArgs& mix,
                                                                                bool table_grad_cuda, void* stream) {
  at::Tensor table = window_attention_table_grad(call, table_grad_cuda, stream);
  const auto empty = at::empty({0}, call.qkv.options());
  return {table.defined() ? table : empty, call.grad_pre_mix.defined() ? grad_like(call.grad_pre_mix, mix.pre_mix) : empty,
          call.grad_pre_mix.defined() ? grad_like(call.grad_post_mix, mix.post_mix) : empty,
          call.grad_pre_mix.defined() ? grad_like(call.grad_post_mix_bias, mix.post_mix_bias) : empty};
}

#ifndef VITFAST_NO_REGISTRATION
namespace {

using Opt = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& qkv, const Opt& bias_table, const Opt& bias_index,
                                               const Opt& mask, const Opt& pre_mix, const Opt& pre_mix_bias,
                                               const Opt& post_mix, const Opt& post_mix_bias, int64_t num_heads,
                                               int64_t dim_k, int64_t dim_v, at::IntArrayRef offsets,
                                               int64_t head_stride, double scale, at::IntArrayRef window_size,
                                               at::IntArrayRef shift_size) {
  const WindowAttentionArgs args{qkv,   bias_table, bias_index,  mask,  num_heads,   dim_k,
                                 dim_v, offsets,    head_stride, scale, window_size, shift_size};
  const HeadMixArgs mix{pre_mix, pre_mix_bias, post_mix, post_mix_bias};
  WindowAttentionCall call = prepare_head_mix_forward(args, mix);
  const WindowAttentionParams p = call.params.fwd;
  at::parallel_for(0, p.windows, 1, [&](int64_t b, int64_t e) { head_mix_attention_forward_cpu(p, b, e); });
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse, const Opt& bias_table,
    const Opt& bias_index, const Opt& mask, const Opt& pre_mix, const Opt& pre_mix_bias, const Opt& post_mix,
    const Opt& post_mix_bias, int64_t num_heads, int64_t dim_k, int64_t dim_v, at::IntArrayRef offsets,
    int64_t head_stride, double scale, at::IntArrayRef window_size, at::IntArrayRef shift_size, bool table_grad,
    bool mix_grad) {
  const WindowAttentionArgs args{qkv,   bias_table, bias_index,  mask,  num_heads,   dim_k,
                                 dim_v, offsets,    head_stride, scale, window_size, shift_size};
  const HeadMixArgs mix{pre_mix, pre_mix_bias, post_mix, post_mix_bias};
  WindowAttentionCall call = prepare_head_mix_backward(args, mix, grad_out, lse, table_grad, mix_grad);
  const WindowAttentionBackwardParams p = call.params;
  const int64_t windows = p.fwd.windows;
  // Fixed chunks of windows, each summing its small-parameter gradients into its own partial,
  // added in chunk order: deterministic for a given thread count. Bias partials capped at ~256 MB.
  const int64_t dbias_bytes = call.dbias.defined() ? call.dbias.numel() * call.dbias.element_size() : 0;
  const int64_t cap = dbias_bytes ? std::max<int64_t>(1, (int64_t{256} << 20) / dbias_bytes) : windows;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({windows, at::get_num_threads(), cap}));
  const auto acc = qkv.options().dtype(acc_type(qkv));
  const int64_t H = num_heads, per_chunk = H * H * 2 + H;
  at::Tensor mix_part = at::zeros({chunks, per_chunk}, acc);
  at::Tensor bias_part = dbias_bytes ? at::zeros({chunks, call.dbias.numel()}, acc) : at::Tensor();
  char* mix_base = static_cast<char*>(mix_part.data_ptr());
  char* bias_base = dbias_bytes ? static_cast<char*>(bias_part.data_ptr()) : nullptr;
  const int64_t esize = mix_part.element_size();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      WindowAttentionBackwardParams pc = p;
      char* m = mix_base + c * per_chunk * esize;
      if (p.grad_pre_mix != nullptr) {
        pc.grad_pre_mix = m;
        pc.grad_post_mix = m + H * H * esize;
        pc.grad_post_mix_bias = m + 2 * H * H * esize;
      }
      if (bias_base != nullptr) pc.dbias = bias_base + c * dbias_bytes;
      head_mix_attention_backward_cpu(pc, windows * c / chunks, windows * (c + 1) / chunks);
    }
  });
  if (mix_grad) {
    const at::Tensor total = mix_part.sum(0);
    call.grad_pre_mix.copy_(total.narrow(0, 0, H * H).view({H, H}));
    call.grad_post_mix.copy_(total.narrow(0, H * H, H * H).view({H, H}));
    call.grad_post_mix_bias.copy_(total.narrow(0, 2 * H * H, H));
  }
  if (dbias_bytes) call.dbias.copy_(bias_part.sum(0).view_as(call.dbias));
  auto [table, pre, post, post_bias] = head_mix_param_grads(call, mix, false, nullptr);
  return {call.grad_qkv, table, pre, post, post_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("head_mix_attention_forward", &forward_cpu);
  m.impl("head_mix_attention_backward", &backward_cpu);
}

#endif  // VITFAST_NO_REGISTRATION

}  // namespace vitfast
