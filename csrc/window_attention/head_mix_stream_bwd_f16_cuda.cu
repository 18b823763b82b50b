// The streaming head-mix backward (head_mix_stream_bwd.cuh) for __half: the query-major kernel and
// the host sequence, in its own unit (its 16 instantiations would double the compile time of
// head_mix_bwd_f16_cuda.cu); the key-major kernel is in head_mix_stream_bwd_kv_f16_cuda.cu;
// the 12-head query-major kernel in head_mix_stream_bwd_h12_f16_cuda.cu.
#include "head_mix_stream_bwd.cuh"
#include "head_mix_stream_bwd_entry.h"

namespace vitfast {

bool head_mix_stream_bwd_workspace_f16(const WindowAttentionBackwardParams& b, int64_t* elements) {
  return mix_stream_try_backward_workspace<__half>(b, elements);
}

bool head_mix_stream_bwd_launch_f16(const WindowAttentionBackwardParams& b, void* workspace, void* stream, int* err) {
  return mix_stream_try_backward<__half>(b, workspace, static_cast<cudaStream_t>(stream), err);
}

}  // namespace vitfast
