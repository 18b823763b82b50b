// Glue of vitfast::head_mix_attention_{forward,backward}: window attention's checks plus the
// mixing transforms (shared by the CPU and CUDA registrations and the CUDA emulator binding).
#pragma once

#include "window_attention_op.h"

namespace vitfast {

struct HeadMixArgs {
  const c10::optional<at::Tensor>& pre_mix;        // (heads, heads)
  const c10::optional<at::Tensor>& pre_mix_bias;   // (heads,): cancels in the softmax, checked only
  const c10::optional<at::Tensor>& post_mix;       // (heads, heads)
  const c10::optional<at::Tensor>& post_mix_bias;  // (heads,)
};

WindowAttentionCall prepare_head_mix_forward(const WindowAttentionArgs& a, const HeadMixArgs& mix);

// mix_grad: also the gradients of pre_mix, post_mix and post_mix_bias (accumulation dtype,
// zero-filled, in call.grad_*).
WindowAttentionCall prepare_head_mix_backward(const WindowAttentionArgs& a, const HeadMixArgs& mix,
                                              const at::Tensor& grad_out, const at::Tensor& lse, bool table_grad,
                                              bool mix_grad);

// CUDA: a (heads, N, N) buffer the kernels fill with the table part of the bias (the mask is added
// after the mix, so it cannot be folded in), when it takes at most 64 MB.
void attach_head_mix_table_buffer(WindowAttentionCall& call);

// The op's gradient outputs: (grad_table, grad_pre_mix, grad_post_mix, grad_post_mix_bias), each in
// its parameter's dtype, or an empty tensor where not wanted. table_grad_cuda: sum the table
// gradient with the CUDA kernel on that stream.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_mix_param_grads(
    const WindowAttentionCall& call, const HeadMixArgs& mix, bool table_grad_cuda, void* stream);

}  // namespace vitfast
