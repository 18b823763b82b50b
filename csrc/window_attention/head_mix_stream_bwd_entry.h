// Entry points of the streaming head-mix backward (head_mix_stream_bwd.cuh), three units per 16-bit
// dtype. head_mix_stream_bwd_<dtype>_cuda.cu: workspace and launch of the whole backward, false
// when the shape is not its (the caller then runs the tile backward), *err the launch's
// cudaError_t. head_mix_stream_bwd_kv_<dtype>_cuda.cu: the key-major kernel alone, which the first
// unit launches (returns a cudaError_t). head_mix_stream_bwd_h12_<dtype>_cuda.cu: workspace and
// host sequence of the 12-head shape (its query-major kernel compiles as long as all the others),
// which the first unit calls for 12 heads (a cudaError_t).
#pragma once

#include <cstdint>

#include "window_attention.h"

namespace vitfast {

bool head_mix_stream_bwd_workspace_f16(const WindowAttentionBackwardParams& b, int64_t* elements);
bool head_mix_stream_bwd_launch_f16(const WindowAttentionBackwardParams& b, void* workspace, void* stream, int* err);
bool head_mix_stream_bwd_workspace_bf16(const WindowAttentionBackwardParams& b, int64_t* elements);
bool head_mix_stream_bwd_launch_bf16(const WindowAttentionBackwardParams& b, void* workspace, void* stream, int* err);
int64_t head_mix_stream_bwd_h12_workspace_f16(const WindowAttentionBackwardParams& b);
int head_mix_stream_bwd_h12_launch_f16(const WindowAttentionBackwardParams& b, void* workspace, void* stream);
int64_t head_mix_stream_bwd_h12_workspace_bf16(const WindowAttentionBackwardParams& b);
int head_mix_stream_bwd_h12_launch_bf16(const WindowAttentionBackwardParams& b, void* workspace, void* stream);
int head_mix_stream_bwd_kv_launch_f16(const WindowAttentionBackwardParams& b, const float* bias, const float* dd,
                                      void* stream);
int head_mix_stream_bwd_kv_launch_bf16(const WindowAttentionBackwardParams& b, const float* bias, const float* dd,
                                       void* stream);

}  // namespace vitfast
