// Windowed multi-head attention with a gathered relative-position bias (Swin, TinyViT):
// torch-free parameters, token addressing shared by the CPU and CUDA kernels, entry points.
//
// Layout. The kernels read q, k, v straight from the output of the model's qkv linear: one tensor
// whose last dim (unit stride) holds, for head h, q at q_off + h*head_stride + [0, dim_k), k at
// k_off + h*head_stride + [0, dim_k), v at v_off + h*head_stride + [0, dim_v). Swin packs
// (3, heads, d): offsets (0, C, 2C), head_stride d; TinyViT packs (heads, 2*dk+dv): offsets
// (0, dk, 2*dk), head_stride 2*dk+dv. The output holds head h's values at h*dim_v + [0, dim_v),
// which is what the projection after attention takes (no permute copies on either side).
//
// Tokens are addressed through a grid: `images` feature maps of grid_h x grid_w tokens, cut into
// win_h x win_w windows after a cyclic shift by (shift_h, shift_w) (Swin's torch.roll(-shift)).
// Window w = (image, window row, window col) in row-major order, token t row-major inside it.
// Already-partitioned input (windows, N, C) is the degenerate grid 1 x N with one 1 x N window,
// so window partition, reverse and the cyclic shift are index arithmetic, never copies.
//
// Bias: bias[h, i, j] = table[h, index[i, j]] (table any strides, index (N, N) contiguous int32
// or int64), plus mask[w % mask_windows, i, j] (Swin's shifted-window mask), both optional.
//
// Head mixing (MiniViT's weight transformation, CaiT's talking heads): the same attention with
// two H x H transforms across heads, S'_g = sum_h pre[g, h] S_h (+ mask, after the mix) and
// P'_g = sum_h post[g, h] softmax(S'_h) + post_bias[g]; out_g = P'_g v_g. A bias before the
// softmax cancels in it, so the kernels never see one. The mixed kernels need every head of a
// window in one block and the softmax statistics of the mixed scores before the second mix, so
// they run two passes over the keys (statistics, then probabilities) -- see head_mix_*.cuh.
#pragma once

#include <cstdint>

#include "../common/dtype.h"

namespace vitfast {

struct WindowGrid {
  int64_t images = 0;
  int32_t grid_h = 0, grid_w = 0;    // tokens per feature map
  int32_t win_h = 0, win_w = 0;      // window size; divides the grid
  int32_t shift_h = 0, shift_w = 0;  // cyclic shift, in [0, grid)

  VF_HD int32_t windows_x() const { return grid_w / win_w; }
  VF_HD int64_t windows_per_image() const { return static_cast<int64_t>(grid_h / win_h) * windows_x(); }
  VF_HD int32_t tokens() const { return win_h * win_w; }
};

// Element offset of token t of window w in a tensor with strides (s_img, s_y, s_x) over
// (image, grid row, grid col). Sharing this between CPU and CUDA makes the CPU tests cover the
// GPU's addressing.
VF_HD int64_t token_offset(const WindowGrid& g, int64_t s_img, int64_t s_y, int64_t s_x, int64_t w, int32_t t) {
  const int64_t per_image = g.windows_per_image();
  const int64_t img = w / per_image;
  const int32_t wi = static_cast<int32_t>(w - img * per_image);
  const int32_t nwx = g.windows_x();
  const int32_t wy = wi / nwx, wx = wi - wy * nwx;
  const int32_t ty = t / g.win_w, tx = t - ty * g.win_w;
  int32_t y = wy * g.win_h + ty + g.shift_h;
  int32_t x = wx * g.win_w + tx + g.shift_w;
  if (y >= g.grid_h) y -= g.grid_h;
  if (x >= g.grid_w) x -= g.grid_w;
  return img * s_img + y * s_y + x * s_x;
}

struct Strides3 {
  int64_t img = 0, y = 0, x = 0;
};

struct WindowAttentionParams {
  DType dtype = DType::kFloat32;  // qkv, out (and grad_out / grad_qkv in the backward)
  WindowGrid grid;
  int64_t windows = 0;  // images * windows_per_image
  int32_t tokens = 0;   // N = win_h * win_w
  int32_t heads = 0, dim_k = 0, dim_v = 0;
  int32_t q_off = 0, k_off = 0, v_off = 0, head_stride = 0;
  double scale = 1.0;

  const void* qkv = nullptr;
  Strides3 qkv_strides;
  void* out = nullptr;  // channel h*dim_v + c
  Strides3 out_strides;
  void* lse = nullptr;  // (windows, heads, tokens) log-sum-exp of the biased scores; float (double for fp64)

  const void* table = nullptr;  // (heads, table_len), may be null
  DType table_dtype = DType::kFloat32;
  int64_t table_stride_h = 0, table_stride_l = 0, table_len = 0;
  const void* index = nullptr;  // (tokens, tokens) contiguous
  bool index_int64 = true;
  const void* mask = nullptr;  // (mask_windows, tokens, tokens) contiguous, may be null
  DType mask_dtype = DType::kFloat32;
  int64_t mask_windows = 1;

  // Head mixing (head_mix_attention_* only): pre, post (heads, heads) and post_bias (heads),
  // contiguous, in the accumulation type (float; double for fp64). The glue passes the identity
  // for a missing transform and zeros for a missing bias.
  const void* pre_mix = nullptr;
  const void* post_mix = nullptr;
  const void* post_mix_bias = nullptr;

  // CUDA only, optional: a (window types, heads, tokens x tokens padded to 4) buffer (float; double for fp64)
  // that the kernels first fill with table[h, index] + mask[type], then read with one load per
  // score instead of the index -> table and mask gathers. Types = mask_windows with a mask, else 1.
  void* bias_buffer = nullptr;
};

// Elements of one (window type, head) block of the bias buffer: the N x N bias (row-major, rows N
// apart) padded to a multiple of 4, so every block starts 16-byte aligned (vector loads).
VF_HD int64_t window_attention_bias_block(const WindowAttentionParams& p) {
  return (static_cast<int64_t>(p.tokens) * p.tokens + 3) / 4 * 4;
}

// Elements of the optional bias buffer (0 when there is neither a table nor a mask).
VF_HD int64_t window_attention_bias_elements(const WindowAttentionParams& p) {
  if (p.table == nullptr && p.mask == nullptr) return 0;
  return (p.mask != nullptr ? p.mask_windows : 1) * p.heads * window_attention_bias_block(p);
}

struct WindowAttentionBackwardParams {
  WindowAttentionParams fwd;  // inputs, saved out and lse
  const void* grad_out = nullptr;  // out_strides
  void* grad_qkv = nullptr;        // zero-filled by the caller where q/k/v leave channel gaps
  Strides3 grad_qkv_strides;
  void* dbias = nullptr;  // (heads, tokens, tokens) sum over windows of dL/dscore; float (double for fp64); may be null
  // Head mixing: gradients of pre (heads, heads), post (heads, heads), post_bias (heads), in the
  // accumulation type; null when not wanted. CPU kernels add into them, CUDA kernels overwrite.
  void* grad_pre_mix = nullptr;
  void* grad_post_mix = nullptr;
  void* grad_post_mix_bias = nullptr;
};

// Limits the kernels are written for (checked by the glue, named in its errors).
constexpr int kWindowAttnMaxHeadDim = 256;
constexpr int kWindowAttnMaxTokens = 4096;
constexpr int kHeadMixMaxHeads = 32;  // head mixing keeps every head's score of a (row, key) in registers

// Table gradient from dbias (heads, nn) with nn = tokens^2: out[h, l] = sum of dbias[h, order[e]]
// over e in [bounds[l], bounds[l + 1]), in that order (order: the entries sorted stably by table
// slot), so the result is bitwise reproducible. Acc = float (double when f64); out (heads, L).
void window_attention_segment_sum_cpu(const void* dbias, bool f64, const int64_t* order, const int64_t* bounds,
                                      int64_t heads, int64_t L, int64_t nn, void* out);
int window_attention_segment_sum_cuda(const void* dbias, bool f64, const int64_t* order, const int64_t* bounds,
                                      int64_t heads, int64_t L, int64_t nn, void* out, void* stream);

// CPU: windows [w_begin, w_end); the backward adds this range's bias gradient into p.dbias.
void window_attention_forward_cpu(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end);
void window_attention_backward_cpu(const WindowAttentionBackwardParams& p, int64_t w_begin, int64_t w_end);

// CUDA (stream is a cudaStream_t): returns a cudaError_t as int. The backward needs a float32
// (float64 for fp64) workspace of window_attention_backward_workspace(p) elements.
int window_attention_forward_cuda(const WindowAttentionParams& p, void* stream);
int64_t window_attention_backward_workspace(const WindowAttentionBackwardParams& p);  // < 0: no configuration fits
bool window_attention_forward_fits(const WindowAttentionParams& p);  // a launch configuration fits this GPU
// Which CUDA kernels run these arguments on the current GPU: "registers" (fp16/bf16, <= 64 tokens,
// head dims <= 64, sm_80+; window_attention_reg.cuh) or "tiles" (everything else).
const char* window_attention_cuda_route(const WindowAttentionParams& p);
int window_attention_backward_cuda(const WindowAttentionBackwardParams& p, void* workspace, void* stream);

// Head-mixing attention, same conventions. p.lse holds the log-sum-exp of the mixed scores S'.
void head_mix_attention_forward_cpu(const WindowAttentionParams& p, int64_t w_begin, int64_t w_end);
void head_mix_attention_backward_cpu(const WindowAttentionBackwardParams& p, int64_t w_begin, int64_t w_end);
// CUDA: workspaces in elements of the accumulation type; < 0 when no launch configuration fits.
int64_t head_mix_attention_forward_workspace(const WindowAttentionParams& p);
int head_mix_attention_forward_cuda(const WindowAttentionParams& p, void* workspace, void* stream);
int64_t head_mix_attention_backward_workspace(const WindowAttentionBackwardParams& p);
// "registers" (fp16/bf16, <= 64 tokens, head dims <= 32, 3 or 4 heads, sm_80+; head_mix_reg.cuh),
// "stream" (fp16/bf16 of any length, 3/4/6/8/12 heads of <= 64 channels and 16 of <= 32, with or
// without a table and a mask: the streaming forward and backward, head_mix_stream*.cuh; 12 heads of
// 48-64 on the head-split backward, 16 of <= 32 on the head-split forward and backward,
// head_mix_split_*.cuh), "stream+tiles" (the streaming or head-split forward, the tile backward:
// 16 heads of 48-64, 24 of <= 32, table-gradient sums past their limit, or
// VITFAST_HEAD_MIX_STREAM_BWD=0) or "tiles".
const char* head_mix_attention_cuda_route(const WindowAttentionParams& p);
int head_mix_attention_backward_cuda(const WindowAttentionBackwardParams& p, void* workspace, void* stream);

}  // namespace vitfast
