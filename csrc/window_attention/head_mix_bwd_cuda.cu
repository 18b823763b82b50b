// Head-mixing attention backward on CUDA: entry points (kernels in head_mix_bwd.cuh).
#include "head_mix_bwd.cuh"
#include "window_attention_dispatch.cuh"

namespace vitfast {

int64_t head_mix_attention_backward_workspace(const WindowAttentionBackwardParams& p) {
  return with_dtype(p.fwd.dtype, [&](auto t) { return head_mix_backward_workspace_typed<decltype(t)>(p); });
}

int head_mix_attention_backward_cuda(const WindowAttentionBackwardParams& p, void* workspace, void* stream) {
  if (p.fwd.windows == 0) return 0;  // gradients stay as allocated: zeros
  return with_dtype(p.fwd.dtype, [&](auto t) {
    return with_heads_cap(p.fwd.heads, [&](auto cap) {
      return head_mix_backward_typed<decltype(t), decltype(cap)::value>(p, workspace,
                                                                        static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace vitfast
