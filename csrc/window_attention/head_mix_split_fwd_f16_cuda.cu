// The head-split head-mix forward (head_mix_split_fwd.cuh: 16 and 24 heads, 12 of 48-64 on request)
// for __half, called by the streaming forward's dispatch in head_mix_fwd_f16_cuda.cu.
#include "head_mix_split_fwd.cuh"

namespace vitfast {

int head_mix_split_fwd_launch_f16(const WindowAttentionParams& p, float* mixed_bias, void* stream) {
  return mix_split_forward_any<__half>(p, mixed_bias, static_cast<cudaStream_t>(stream));
}

}  // namespace vitfast
