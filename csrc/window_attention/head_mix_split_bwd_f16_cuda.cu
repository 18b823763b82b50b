// The head-split head-mix backward (head_mix_split_bwd.cuh: 12 heads of 48-64 channels, DeiT-B) for
// __half: workspace and host sequence with both kernels, called by head_mix_stream_bwd_f16_cuda.cu.
#include "head_mix_split_bwd.cuh"

namespace vitfast {

int64_t head_mix_split_bwd_workspace_f16(const WindowAttentionBackwardParams& b) {
  return mix_split_bwd_workspace<__half, 12, 64>(b);
}

int head_mix_split_bwd_launch_f16(const WindowAttentionBackwardParams& b, void* workspace, void* stream) {
  return mix_split_backward<__half, 12, 64>(b, static_cast<float*>(workspace), static_cast<cudaStream_t>(stream));
}

}  // namespace vitfast
