// Entry points of the head-split head-mix backward (head_mix_split_bwd.cuh; 12 heads of 48-64
// channels, 16 of <= 32), one unit per 16-bit dtype (head_mix_split_bwd_<dtype>_cuda.cu), called by the
// streaming backward's dispatch (head_mix_stream_bwd.cuh) for that shape: the workspace (floats)
// and the launch of the whole backward (a cudaError_t).
#pragma once

#include <cstdint>

#include "window_attention.h"

namespace vitfast {

int64_t head_mix_split_bwd_workspace_f16(const WindowAttentionBackwardParams& b);
int head_mix_split_bwd_launch_f16(const WindowAttentionBackwardParams& b, void* workspace, void* stream);
int64_t head_mix_split_bwd_workspace_bf16(const WindowAttentionBackwardParams& b);
int head_mix_split_bwd_launch_bf16(const WindowAttentionBackwardParams& b, void* workspace, void* stream);

}  // namespace vitfast
