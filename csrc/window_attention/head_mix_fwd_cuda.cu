// Head-mixing attention forward on CUDA: entry points (kernels in head_mix_fwd.cuh).
#include "head_mix_fwd.cuh"
#include "window_attention_dispatch.cuh"

namespace vitfast {

int64_t head_mix_attention_forward_workspace(const WindowAttentionParams& p) {
  return with_dtype(p.dtype, [&](auto t) { return head_mix_forward_workspace_typed<decltype(t)>(p); });
}

int head_mix_attention_forward_cuda(const WindowAttentionParams& p, void* workspace, void* stream) {
  if (p.windows == 0) return 0;  // an empty batch launches nothing
  return with_dtype(p.dtype, [&](auto t) {
    return with_heads_cap(p.heads, [&](auto cap) {
      return head_mix_forward_typed<decltype(t), decltype(cap)::value>(p, workspace, static_cast<cudaStream_t>(stream));
    });
  });
}

}  // namespace vitfast
