// The head-mixing kernels' entry points per storage dtype. Each dtype's kernels live in their own
// translation unit (head_mix_{fwd,bwd}_<dtype>_cuda.cu), so a build compiles them in parallel: the
// backward's four instantiations in one unit were the build's critical path (72 s of ~125 s on the
// first H100 run's 16 cores). head_mix_cuda.cu maps the run-time dtype onto them.
#pragma once

#include <cstdint>

#include "window_attention.h"

namespace vitfast {

#define VF_HEAD_MIX_DECLARE(NAME)                                                                           \
  int64_t head_mix_fwd_workspace_##NAME(const WindowAttentionParams& p);                                    \
  int head_mix_fwd_launch_##NAME(const WindowAttentionParams& p, void* workspace, void* stream);             \
  int64_t head_mix_bwd_workspace_##NAME(const WindowAttentionBackwardParams& p);                            \
  int head_mix_bwd_launch_##NAME(const WindowAttentionBackwardParams& p, void* workspace, void* stream);
VF_HEAD_MIX_DECLARE(f16)
VF_HEAD_MIX_DECLARE(bf16)
VF_HEAD_MIX_DECLARE(f32)
VF_HEAD_MIX_DECLARE(f64)
#undef VF_HEAD_MIX_DECLARE

}  // namespace vitfast
