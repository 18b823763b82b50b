// Entry points of the streaming head-mix backward (head_mix_stream_bwd.cuh), one unit per 16-bit
// dtype (head_mix_stream_bwd_<dtype>_cuda.cu): false when the shape is not its (the caller then
// runs the tile backward); *err the launch's cudaError_t.
#pragma once

#include <cstdint>

#include "window_attention.h"

namespace vitfast {

bool head_mix_stream_bwd_workspace_f16(const WindowAttentionBackwardParams& b, int64_t* elements);
bool head_mix_stream_bwd_launch_f16(const WindowAttentionBackwardParams& b, void* workspace, void* stream, int* err);
bool head_mix_stream_bwd_workspace_bf16(const WindowAttentionBackwardParams& b, int64_t* elements);
bool head_mix_stream_bwd_launch_bf16(const WindowAttentionBackwardParams& b, void* workspace, void* stream, int* err);

}  // namespace vitfast
