// The key-major kernel of the streaming head-mix backward (head_mix_stream_bwd.cuh) for __half,
// in its own unit so that its 18 instantiations compile beside the query-major kernel's
// (head_mix_stream_bwd_f16_cuda.cu, which launches it) instead of after them.
#include "head_mix_stream_bwd.cuh"
#include "head_mix_stream_bwd_entry.h"

namespace vitfast {

int head_mix_stream_bwd_kv_launch_f16(const WindowAttentionBackwardParams& b, const float* bias, const float* dd,
                                   void* stream) {
  return mix_stream_try_backward_kv<__half>(b, bias, dd, static_cast<cudaStream_t>(stream));
}

}  // namespace vitfast
