// Windowed attention with a gathered bias on CUDA (torch-free).
//
// fp16/bf16 windows of at most 64 tokens (Swin, TinyViT) run the register-resident kernels of
// window_attention_reg.cuh instead (see there); what follows describes the tile kernels.
//
// Forward: one block per (window, head group, query chunk); all heads of a window sit in one
// block whenever shared memory allows (small windows then get enough work per block, and a
// head-mixing transform across heads could run in the same block). Keys stream through shared memory in tiles of 64; each warp owns 16-query-row work
// items (head, query tile) with an online softmax (running max / sum per row, fp32 output
// accumulator in shared memory). Products run on tensor cores for fp16/bf16 (WMMA), SIMT for
// fp32/fp64. The bias table gather and the shifted-window mask are read inside the softmax step;
// no (heads, N, N) bias is ever materialised.
//
// Backward (FlashAttention-2 style, recomputing P from the saved log-sum-exp): one block per
// (window slot, head group, key chunk) holds K, V and fp32 dK, dV for its keys and streams query
// tiles; dQ is summed across the block's key tiles in shared memory. Blocks loop over windows
// (w = slot, slot + slots, ...) and add dS into a per-slot bias-gradient partial that no other
// block touches; a last pass sums the slots in a fixed order, so the table gradient is
// deterministic.
//
// Head mixing (MiniViT, CaiT): head_mix_*.cuh. Same blocks-hold-all-heads layout, tile loads, bias
// access and planning helpers, but a two-pass forward and a two-kernel backward, because the
// mixes need every head's final softmax statistics (head_mix_common.cuh explains why); 16-bit
// windows of <= 64 tokens with 3 or 4 heads of <= 32 channels run register kernels instead
// (head_mix_reg.cuh; which shapes: head_mix_reg_rule.h).
//
// Files: window_attention_device.cuh (shared access, tile loads, planning helpers),
// window_attention_reg.cuh (register kernels, small windows),
// window_attention_fwd.cuh / window_attention_bwd.cuh (plain kernels), head_mix_fwd.cuh /
// head_mix_bwd.cuh (the head-mixing variants), window_attention_dispatch.cuh (run-time dtype and
// head count -> template parameters). Entry points: this file (plain) and head_mix_cuda.cu, whose
// kernels are compiled one dtype and direction per unit (head_mix_{fwd,bwd}_<dtype>_cuda.cu), so
// the build compiles them in parallel.
#include "window_attention_bwd.cuh"
#include "window_attention_dispatch.cuh"
#include "window_attention_fwd.cuh"

namespace vitfast {
int window_attention_segment_sum_cuda(const void* dbias, bool f64, const int64_t* order, const int64_t* bounds,
                                      int64_t heads, int64_t L, int64_t nn, void* out, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (f64) {
    auto k = window_attention_segment_sum_kernel<double>;
    VF_LAUNCH(k, blocks_for(heads * L, 256), 256, 0, s, static_cast<const double*>(dbias), order, bounds, heads, L,
              nn, static_cast<double*>(out));
  } else {
    auto k = window_attention_segment_sum_kernel<float>;
    VF_LAUNCH(k, blocks_for(heads * L, 256), 256, 0, s, static_cast<const float*>(dbias), order, bounds, heads, L,
              nn, static_cast<float*>(out));
  }
  return static_cast<int>(cudaGetLastError());
}

bool window_attention_forward_fits(const WindowAttentionParams& p) {
  return with_dtype(p.dtype, [&](auto t) {
    using T = decltype(t);
    size_t smem = 0;
    plan_fwd<T, typename wa::AccOf<T>::type>(p, device_smem_optin(), &smem);
    return smem != 0;
  });
}

const char* window_attention_cuda_route(const WindowAttentionParams& p) {
  return with_dtype(p.dtype, [&](auto t) { return reg_route_ok<decltype(t)>(p) ? "registers" : "tiles"; });
}

int window_attention_forward_cuda(const WindowAttentionParams& p, void* stream) {
  if (p.windows == 0) return 0;  // an empty batch launches nothing (a 0-block grid is an error)
  return with_dtype(p.dtype, [&](auto t) { return forward_typed<decltype(t)>(p, static_cast<cudaStream_t>(stream)); });
}

int64_t window_attention_backward_workspace(const WindowAttentionBackwardParams& p) {
  return with_dtype(p.fwd.dtype, [&](auto t) { return workspace_typed<decltype(t)>(p); });
}

int window_attention_backward_cuda(const WindowAttentionBackwardParams& p, void* workspace, void* stream) {
  if (p.fwd.windows == 0) return 0;  // gradients stay as allocated: zeros
  return with_dtype(p.fwd.dtype, [&](auto t) {
    return backward_typed<decltype(t)>(p, workspace, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace vitfast
