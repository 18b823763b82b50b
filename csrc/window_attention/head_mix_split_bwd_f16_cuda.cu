// The head-split head-mix backward (head_mix_split_bwd.cuh: 12 heads of 48-64 channels, DeiT-B; 16
// of <= 32, Mini-Swin-B stage 3) for __half: workspace and host sequence with both kernels, called by
// head_mix_stream_bwd_f16_cuda.cu.
#include "head_mix_split_bwd.cuh"

namespace vitfast {

int64_t head_mix_split_bwd_workspace_f16(const WindowAttentionBackwardParams& b) {
  return b.fwd.heads == 12 ? mix_split_bwd_workspace<__half, 12, 64>(b) : mix_split_bwd_workspace<__half, 16, 32>(b);
}

int head_mix_split_bwd_launch_f16(const WindowAttentionBackwardParams& b, void* workspace, void* stream) {
  float* ws = static_cast<float*>(workspace);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return b.fwd.heads == 12 ? mix_split_backward<__half, 12, 64>(b, ws, s) : mix_split_backward<__half, 16, 32>(b, ws, s);
}

}  // namespace vitfast
