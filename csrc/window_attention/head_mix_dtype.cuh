// One storage dtype's head-mixing kernels (forward when VF_HM_FWD is defined, else backward):
// included by the head_mix_{fwd,bwd}_<dtype>_cuda.cu units with VF_HM_T (the storage type) and
// VF_HM_NAME (the suffix of head_mix_entry.h) defined; VF_HM_STREAM_BWD (16-bit backward units):
// try the streaming backward's unit first (head_mix_stream_bwd_entry.h). No include guard: the
// CUDA emulator binding includes every unit into one file.
#include "head_mix_entry.h"
#include "head_mix_reg.cuh"
#include "window_attention_dispatch.cuh"
#ifdef VF_HM_FWD
#include "head_mix_fwd.cuh"
#include "head_mix_stream.cuh"
#else
#include "head_mix_bwd.cuh"
#include "head_mix_stream_bwd_entry.h"
#endif

#ifndef VF_HM_CAT
#define VF_HM_CAT2(a, b) a##b
#define VF_HM_CAT(a, b) VF_HM_CAT2(a, b)
#endif

namespace vitfast {

#ifdef VF_HM_FWD
// fp16/bf16 shapes the register kernels take go there (head_mix_reg.cuh), longer windows or more
// heads to the streaming kernels (head_mix_stream.cuh; the backward of sequences with 3-6 heads:
// head_mix_stream_bwd.cuh), the rest to the tile kernels.
int64_t VF_HM_CAT(head_mix_fwd_workspace_, VF_HM_NAME)(const WindowAttentionParams& p) {
  int64_t elements = 0;
  if (mix_reg_try_forward_workspace<VF_HM_T>(p, &elements)) return elements;
  if (mix_stream_try_forward_workspace<VF_HM_T>(p, &elements)) return elements;
  return head_mix_forward_workspace_typed<VF_HM_T>(p);
}

int VF_HM_CAT(head_mix_fwd_launch_, VF_HM_NAME)(const WindowAttentionParams& p, void* workspace, void* stream) {
  int err = 0;
  if (mix_reg_try_forward<VF_HM_T>(p, workspace, static_cast<cudaStream_t>(stream), &err)) return err;
  if (mix_stream_try_forward<VF_HM_T>(p, workspace, static_cast<cudaStream_t>(stream), &err)) return err;
  return with_heads_cap(p.heads, [&](auto cap) {
    return head_mix_forward_typed<VF_HM_T, decltype(cap)::value>(p, workspace, static_cast<cudaStream_t>(stream));
  });
}
#else
int64_t VF_HM_CAT(head_mix_bwd_workspace_, VF_HM_NAME)(const WindowAttentionBackwardParams& p) {
  int64_t elements = 0;
  if (mix_reg_try_backward_workspace<VF_HM_T>(p, &elements)) return elements;
#ifdef VF_HM_STREAM_BWD
  if (VF_HM_CAT(head_mix_stream_bwd_workspace_, VF_HM_NAME)(p, &elements)) return elements;
#endif
  return head_mix_backward_workspace_typed<VF_HM_T>(p);
}

int VF_HM_CAT(head_mix_bwd_launch_, VF_HM_NAME)(const WindowAttentionBackwardParams& p, void* workspace,
                                                void* stream) {
  int err = 0;
  if (mix_reg_try_backward<VF_HM_T>(p, workspace, static_cast<cudaStream_t>(stream), &err)) return err;
#ifdef VF_HM_STREAM_BWD
  if (VF_HM_CAT(head_mix_stream_bwd_launch_, VF_HM_NAME)(p, workspace, stream, &err)) return err;
#endif
  return with_heads_cap(p.fwd.heads, [&](auto cap) {
    return head_mix_backward_typed<VF_HM_T, decltype(cap)::value>(p, workspace, static_cast<cudaStream_t>(stream));
  });
}
#endif

}  // namespace vitfast

#undef VF_HM_T
#undef VF_HM_NAME
#undef VF_HM_FWD
#undef VF_HM_STREAM_BWD
