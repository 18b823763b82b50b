// Glue shared by the CPU and CUDA registrations of vitfast::window_attention_{forward,backward}:
// argument checks, allocation, and the table-gradient scatter.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "window_attention.h"

namespace vitfast {

// Everything the ops take besides the tensors that differ between forward and backward.
struct WindowAttentionArgs {
  const at::Tensor& qkv;
  const c10::optional<at::Tensor>& bias_table;
  const c10::optional<at::Tensor>& bias_index;
  const c10::optional<at::Tensor>& mask;
  int64_t num_heads, dim_k, dim_v;
  at::IntArrayRef offsets;
  int64_t head_stride;
  double scale;
  at::IntArrayRef window_size, shift_size;
  const char* op = "window_attention";  // the public op name errors report
};

struct WindowAttentionCall {
  at::Tensor qkv, table, index, mask;  // as the kernels read them (table is a view)
  at::Tensor out, lse;                 // forward outputs (backward: saved inputs)
  at::Tensor grad_out, grad_qkv, dbias;
  at::Tensor bias_buffer;  // CUDA: precomputed table + mask bias, when small enough
  at::Tensor pre_mix, post_mix, post_mix_bias;                 // head mixing, accumulation dtype
  at::Tensor grad_pre_mix, grad_post_mix, grad_post_mix_bias;  // head mixing, accumulation dtype
  WindowAttentionBackwardParams params{};
  bool channels_covered = false;  // q, k and v of all heads tile every qkv channel
};

WindowAttentionCall prepare_window_attention_forward(const WindowAttentionArgs& a);

// `out` may be undefined (the head-mixing backward does not read it).
WindowAttentionCall prepare_window_attention_backward(const WindowAttentionArgs& a, const at::Tensor& grad_out,
                                                      const at::Tensor& out, const at::Tensor& lse, bool table_grad);

// CUDA: gives the kernels a precomputed (types, heads, N, N) bias buffer when it takes at most
// 64 MB (e.g. 1.8 MB for Swin-T stage 1), so each score costs one load instead of two gathers.
void attach_window_attention_bias_buffer(WindowAttentionCall& call);

// grad of the (heads, L) table from dbias (heads, N, N), in the table's dtype: each entry sums its
// index slots in a fixed order (a stable sort of the index), so it is bitwise reproducible in every
// mode. cuda_kernel: sum with the CUDA kernel on `cuda_stream` (a cudaStream_t), else on the CPU.
at::Tensor window_attention_table_grad(const WindowAttentionCall& call, bool cuda_kernel = false,
                                       void* cuda_stream = nullptr);

}  // namespace vitfast
