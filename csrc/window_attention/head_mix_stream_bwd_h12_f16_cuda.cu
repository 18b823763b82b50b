// The streaming head-mix backward's 12-head shape (12 heads of <= 32 channels: Mini-Swin-T/S stage 3;
// head_mix_stream_bwd.cuh) for __half: workspace and host sequence with the query-major kernel, in its
// own unit because its unrolled mixing-gradient passes compile as long as every other head count's
// query-major kernels together (head_mix_stream_bwd_f16_cuda.cu, which calls these).
#include "head_mix_stream_bwd.cuh"
#include "head_mix_stream_bwd_entry.h"

namespace vitfast {

int64_t head_mix_stream_bwd_h12_workspace_f16(const WindowAttentionBackwardParams& b) {
  return mix_stream_bwd_workspace<__half, 12, 32>(b);
}

int head_mix_stream_bwd_h12_launch_f16(const WindowAttentionBackwardParams& b, void* workspace, void* stream) {
  return mix_stream_backward<__half, 12, 32>(b, static_cast<float*>(workspace), static_cast<cudaStream_t>(stream));
}

}  // namespace vitfast
