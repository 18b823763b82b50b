// vitfast::head_mix_attention_{forward,backward} on CUDA tensors: shared checks, torch-free kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/torch_glue.h"
#include "head_mix_op.h"

namespace vitfast {
namespace {

using Opt = c10::optional<at::Tensor>;

void check_launch(int err, const WindowAttentionParams& p, const at::Tensor& qkv) {
  VF_CHECK_VALUE(err != static_cast<int>(cudaErrorInvalidConfiguration), "head_mix_attention", "num_heads",
                 p.heads, " heads with head dims (dim_k ", p.dim_k, ", dim_v ", p.dim_v, ") in ",
                 dtype_name(qkv.scalar_type()),
                 " need more shared memory per block than this GPU offers (a block holds every head of a window); "
                 "use a 16-bit dtype or smaller heads");
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

at::Tensor workspace_for(int64_t elements, const WindowAttentionParams& p, const at::Tensor& qkv) {
  if (elements < 0) check_launch(static_cast<int>(cudaErrorInvalidConfiguration), p, qkv);
  return at::empty({std::max<int64_t>(elements, 1)}, qkv.options().dtype(qkv.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& qkv, const Opt& bias_table, const Opt& bias_index,
                                                const Opt& mask, const Opt& pre_mix, const Opt& pre_mix_bias,
                                                const Opt& post_mix, const Opt& post_mix_bias, int64_t num_heads,
                                                int64_t dim_k, int64_t dim_v, at::IntArrayRef offsets,
                                                int64_t head_stride, double scale, at::IntArrayRef window_size,
                                                at::IntArrayRef shift_size) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  const WindowAttentionArgs args{qkv,   bias_table, bias_index,  mask,  num_heads,   dim_k,
                                 dim_v, offsets,    head_stride, scale, window_size, shift_size};
  const HeadMixArgs mix{pre_mix, pre_mix_bias, post_mix, post_mix_bias};
  WindowAttentionCall call = prepare_head_mix_forward(args, mix);
  attach_head_mix_table_buffer(call);
  const at::Tensor ws = workspace_for(head_mix_attention_forward_workspace(call.params.fwd), call.params.fwd, qkv);
  check_launch(head_mix_attention_forward_cuda(call.params.fwd, ws.data_ptr(), at::cuda::getCurrentCUDAStream().stream()),
               call.params.fwd, qkv);
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse, const Opt& bias_table,
    const Opt& bias_index, const Opt& mask, const Opt& pre_mix, const Opt& pre_mix_bias, const Opt& post_mix,
    const Opt& post_mix_bias, int64_t num_heads, int64_t dim_k, int64_t dim_v, at::IntArrayRef offsets,
    int64_t head_stride, double scale, at::IntArrayRef window_size, at::IntArrayRef shift_size, bool table_grad,
    bool mix_grad) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  const WindowAttentionArgs args{qkv,   bias_table, bias_index,  mask,  num_heads,   dim_k,
                                 dim_v, offsets,    head_stride, scale, window_size, shift_size};
  const HeadMixArgs mix{pre_mix, pre_mix_bias, post_mix, post_mix_bias};
  WindowAttentionCall call = prepare_head_mix_backward(args, mix, grad_out, lse, table_grad, mix_grad);
  attach_head_mix_table_buffer(call);
  const at::Tensor ws = workspace_for(head_mix_attention_backward_workspace(call.params), call.params.fwd, qkv);
  void* stream = at::cuda::getCurrentCUDAStream().stream();
  check_launch(head_mix_attention_backward_cuda(call.params, ws.data_ptr(), stream), call.params.fwd, qkv);
  auto [table, pre, post, post_bias] = head_mix_param_grads(call, mix, /*table_grad_cuda=*/true, stream);
  return {call.grad_qkv, table, pre, post, post_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("head_mix_attention_forward", &forward_cuda);
  m.impl("head_mix_attention_backward", &backward_cuda);
}

}  // namespace vitfast
