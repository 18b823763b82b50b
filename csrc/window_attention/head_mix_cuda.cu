// Head-mixing attention on CUDA: the entry points of window_attention.h, mapping the run-time dtype
// onto the per-dtype units (head_mix_entry.h; the kernels are in head_mix_fwd.cuh / head_mix_bwd.cuh).
#include "head_mix_entry.h"
#include "head_mix_reg_rule.h"
#include "head_mix_stream_rule.h"

namespace vitfast {

#define VF_BY_DTYPE(dtype, FN, ...)      \
  switch (dtype) {                       \
    case DType::kFloat16:                \
      return FN##_f16(__VA_ARGS__);      \
    case DType::kBFloat16:               \
      return FN##_bf16(__VA_ARGS__);     \
    case DType::kFloat32:                \
      return FN##_f32(__VA_ARGS__);      \
    default:                             \
      return FN##_f64(__VA_ARGS__);      \
  }

const char* head_mix_attention_cuda_route(const WindowAttentionParams& p) {
  if (mix_reg_route_ok(p)) return "registers";
  if (mix_stream_bwd_route_ok(p)) return "stream";
  return mix_stream_route_ok(p) ? "stream+tiles" : "tiles";
}

int64_t head_mix_attention_forward_workspace(const WindowAttentionParams& p) {
  VF_BY_DTYPE(p.dtype, head_mix_fwd_workspace, p)
}

int head_mix_attention_forward_cuda(const WindowAttentionParams& p, void* workspace, void* stream) {
  if (p.windows == 0) return 0;  // an empty batch launches nothing
  VF_BY_DTYPE(p.dtype, head_mix_fwd_launch, p, workspace, stream)
}

int64_t head_mix_attention_backward_workspace(const WindowAttentionBackwardParams& p) {
  VF_BY_DTYPE(p.fwd.dtype, head_mix_bwd_workspace, p)
}

int head_mix_attention_backward_cuda(const WindowAttentionBackwardParams& p, void* workspace, void* stream) {
  if (p.fwd.windows == 0) return 0;  // gradients stay as allocated: zeros
  VF_BY_DTYPE(p.fwd.dtype, head_mix_bwd_launch, p, workspace, stream)
}

#undef VF_BY_DTYPE

}  // namespace vitfast
