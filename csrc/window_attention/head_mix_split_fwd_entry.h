// Entry point of the head-split head-mix forward (head_mix_split_fwd.cuh; 16 heads of <= 64
// channels, 24 of <= 32, 12 of 48-64 on request), one unit per 16-bit dtype
// (head_mix_split_fwd_<dtype>_cuda.cu), called by the streaming forward's dispatch
// (head_mix_stream.cuh) for those shapes: the launch (a cudaError_t). Its workspace is the
// streaming forward's (the mixed bias).
#pragma once

#include "window_attention.h"

namespace vitfast {

int head_mix_split_fwd_launch_f16(const WindowAttentionParams& p, float* mixed_bias, void* stream);
int head_mix_split_fwd_launch_bf16(const WindowAttentionParams& p, float* mixed_bias, void* stream);

}  // namespace vitfast
