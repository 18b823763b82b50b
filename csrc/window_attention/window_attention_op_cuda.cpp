// vitfast::window_attention_{forward,backward} on CUDA tensors: shared checks, torch-free kernels.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/torch_glue.h"
#include "window_attention_op.h"

namespace vitfast {
namespace {

void check_launch(int err, const WindowAttentionParams& p, const at::Tensor& qkv) {
  VF_CHECK_VALUE(err != static_cast<int>(cudaErrorInvalidConfiguration), "window_attention", "qkv",
                 "head dims (dim_k ", p.dim_k, ", dim_v ", p.dim_v, ") in ", dtype_name(qkv.scalar_type()),
                 " need more shared memory per block than this GPU offers; use a smaller head dim or a 16-bit dtype");
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& qkv, const c10::optional<at::Tensor>& bias_table,
                                                const c10::optional<at::Tensor>& bias_index,
                                                const c10::optional<at::Tensor>& mask, int64_t num_heads,
                                                int64_t dim_k, int64_t dim_v, at::IntArrayRef offsets,
                                                int64_t head_stride, double scale, at::IntArrayRef window_size,
                                                at::IntArrayRef shift_size) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  const WindowAttentionArgs args{qkv,   bias_table, bias_index,  mask,  num_heads,   dim_k,
                                 dim_v, offsets,    head_stride, scale, window_size, shift_size};
  WindowAttentionCall call = prepare_window_attention_forward(args);
  attach_window_attention_bias_buffer(call);
  check_launch(window_attention_forward_cuda(call.params.fwd, at::cuda::getCurrentCUDAStream().stream()),
               call.params.fwd, qkv);
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                 const at::Tensor& out, const at::Tensor& lse,
                                                 const c10::optional<at::Tensor>& bias_table,
                                                 const c10::optional<at::Tensor>& bias_index,
                                                 const c10::optional<at::Tensor>& mask, int64_t num_heads,
                                                 int64_t dim_k, int64_t dim_v, at::IntArrayRef offsets,
                                                 int64_t head_stride, double scale, at::IntArrayRef window_size,
                                                 at::IntArrayRef shift_size, bool table_grad) {
  const c10::cuda::CUDAGuard guard(qkv.device());
  const WindowAttentionArgs args{qkv,   bias_table, bias_index,  mask,  num_heads,   dim_k,
                                 dim_v, offsets,    head_stride, scale, window_size, shift_size};
  WindowAttentionCall call = prepare_window_attention_backward(args, grad_out, out, lse, table_grad);
  attach_window_attention_bias_buffer(call);
  const int64_t ws = window_attention_backward_workspace(call.params);
  if (ws < 0) check_launch(static_cast<int>(cudaErrorInvalidConfiguration), call.params.fwd, qkv);
  const at::Tensor workspace = at::empty({std::max<int64_t>(ws, 1)}, lse.options());
  check_launch(window_attention_backward_cuda(call.params, workspace.data_ptr(),
                                              at::cuda::getCurrentCUDAStream().stream()),
               call.params.fwd, qkv);
  at::Tensor grad_table = window_attention_table_grad(call, /*cuda_kernel=*/true, at::cuda::getCurrentCUDAStream().stream());
  return {call.grad_qkv, grad_table.defined() ? grad_table : at::empty({0}, qkv.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CUDA, m) {
  m.impl("window_attention_forward", &forward_cuda);
  m.impl("window_attention_backward", &backward_cuda);
}

}  // namespace vitfast
