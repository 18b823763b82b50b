// vitfast::window_attention_{forward,backward}: argument checks, allocation, CPU impl.
#include "window_attention_op.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../common/torch_glue.h"

namespace vitfast {
namespace {

constexpr const char* kOp = "window_attention";

at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Strides3 strides_of(const at::Tensor& t, bool grid) {
  // grid: (images, H, W, C); windows: (windows, N, C) = images of one 1 x N row
  if (grid) return {t.stride(0), t.stride(1), t.stride(2)};
  return {t.stride(0), 0, t.stride(1)};
}

void check_float(const at::Tensor& t, const char* op, const char* arg) {
  check_dtype_in(t, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, op, arg);
}

// Fills params.fwd from qkv, the head layout and the grid; returns the channels q/k/v cover.
void check_layout(WindowAttentionCall& call, const WindowAttentionArgs& a) {
  const char* const kOp = a.op;
  const at::Tensor& qkv = a.qkv;
  check_float(qkv, kOp, "qkv");
  const bool grid = qkv.dim() == 4;
  VF_CHECK_VALUE(qkv.dim() == 3 || grid, kOp, "qkv",
                 "must be (windows, tokens, channels) or a feature map (batch, height, width, channels), got shape ",
                 qkv.sizes());
  WindowAttentionParams& p = call.params.fwd;
  WindowGrid& g = p.grid;
  if (grid) {
    VF_CHECK_VALUE(a.window_size.size() == 2 && a.window_size[0] >= 1 && a.window_size[1] >= 1, kOp, "window_size",
                   "must be [win_h, win_w] >= 1 for a feature-map qkv, got ", a.window_size);
    VF_CHECK_VALUE(a.shift_size.size() == 2, kOp, "shift_size", "must be [shift_h, shift_w], got ", a.shift_size);
    const int64_t H = qkv.size(1), W = qkv.size(2);
    VF_CHECK_VALUE(H % a.window_size[0] == 0 && W % a.window_size[1] == 0, kOp, "window_size", a.window_size,
                   " must divide the feature map ", H, " x ", W, " (pad it first)");
    VF_CHECK_VALUE(a.shift_size[0] >= 0 && a.shift_size[0] < H && a.shift_size[1] >= 0 && a.shift_size[1] < W, kOp,
                   "shift_size", "must lie in [0, feature map size) = [0, ", H, ") x [0, ", W, "), got ",
                   a.shift_size);
    g = {qkv.size(0), static_cast<int32_t>(H), static_cast<int32_t>(W), static_cast<int32_t>(a.window_size[0]),
         static_cast<int32_t>(a.window_size[1]), static_cast<int32_t>(a.shift_size[0]),
         static_cast<int32_t>(a.shift_size[1])};
  } else {
    VF_CHECK_VALUE(a.window_size.empty() || (a.window_size.size() == 2 && a.window_size[0] * a.window_size[1] ==
                                                                               qkv.size(1)),
                   kOp, "window_size", "must be empty (or multiply to the token count ", qkv.size(1),
                   ") for already partitioned windows, got ", a.window_size);
    VF_CHECK_VALUE(a.shift_size.empty() || (a.shift_size.size() == 2 && a.shift_size[0] == 0 && a.shift_size[1] == 0),
                   kOp, "shift_size", "must be empty for already partitioned windows (shift the feature map, or pass ",
                   "it whole), got ", a.shift_size);
    g = {qkv.size(0), 1, static_cast<int32_t>(qkv.size(1)), 1, static_cast<int32_t>(qkv.size(1)), 0, 0};
  }
  const int64_t tokens = static_cast<int64_t>(g.win_h) * g.win_w;
  VF_CHECK_VALUE(tokens >= 1 && tokens <= kWindowAttnMaxTokens, kOp, "qkv", "must have between 1 and ",
                 kWindowAttnMaxTokens, " tokens per window, got ", tokens);
  // zero windows (an empty batch) is an empty result, like every vitfast op's empty batch
  VF_CHECK_VALUE(a.num_heads >= 1, kOp, "num_heads", "must be >= 1, got ", a.num_heads);
  VF_CHECK_VALUE(a.dim_k >= 1 && a.dim_k <= kWindowAttnMaxHeadDim, kOp, "dim_k", "must lie in [1, ",
                 kWindowAttnMaxHeadDim, "], got ", a.dim_k);
  VF_CHECK_VALUE(a.dim_v >= 1 && a.dim_v <= kWindowAttnMaxHeadDim, kOp, "dim_v", "must lie in [1, ",
                 kWindowAttnMaxHeadDim, "], got ", a.dim_v);
  VF_CHECK_VALUE(a.offsets.size() == 3, kOp, "offsets", "must be [q_offset, k_offset, v_offset], got ", a.offsets);
  VF_CHECK_VALUE(a.head_stride >= 1, kOp, "head_stride", "must be >= 1, got ", a.head_stride);
  VF_CHECK_VALUE(std::isfinite(a.scale), kOp, "scale", "must be finite, got ", a.scale);

  // q, k and v of every head must lie inside the channels and must not overlap.
  const int64_t C = qkv.size(-1);
  std::vector<char> used(static_cast<size_t>(C), 0);
  const int64_t dims[3] = {a.dim_k, a.dim_k, a.dim_v};
  const char* names[3] = {"q", "k", "v"};
  for (int64_t h = 0; h < a.num_heads; ++h) {
    for (int r = 0; r < 3; ++r) {
      const int64_t lo = a.offsets[r] + h * a.head_stride, hi = lo + dims[r];
      VF_CHECK_VALUE(a.offsets[r] >= 0 && hi <= C, kOp, "offsets", names[r], " of head ", h, " spans channels [", lo,
                     ", ", hi, ") outside qkv's ", C, " channels (offsets ", a.offsets, ", head_stride ",
                     a.head_stride, ")");
      for (int64_t c = lo; c < hi; ++c) {
        VF_CHECK_VALUE(!used[c], kOp, "offsets", names[r], " of head ", h, " overlaps another head's q/k/v at channel ",
                       c, " (offsets ", a.offsets, ", head_stride ", a.head_stride, ")");
        used[c] = 1;
      }
    }
  }
  int64_t covered = 0;
  for (char u : used) covered += u;

  call.qkv = qkv.stride(-1) == 1 ? qkv : qkv.contiguous();
  p.dtype = to_kernel_dtype(qkv.scalar_type());
  p.windows = g.images * g.windows_per_image();
  p.tokens = static_cast<int32_t>(tokens);
  p.heads = static_cast<int32_t>(a.num_heads);
  p.dim_k = static_cast<int32_t>(a.dim_k);
  p.dim_v = static_cast<int32_t>(a.dim_v);
  p.q_off = static_cast<int32_t>(a.offsets[0]);
  p.k_off = static_cast<int32_t>(a.offsets[1]);
  p.v_off = static_cast<int32_t>(a.offsets[2]);
  p.head_stride = static_cast<int32_t>(a.head_stride);
  p.scale = a.scale;
  p.qkv = call.qkv.data_ptr();
  p.qkv_strides = strides_of(call.qkv, grid);
  call.channels_covered = covered == C;

  const auto& table = a.bias_table;
  const auto& index = a.bias_index;
  VF_CHECK_VALUE(table.has_value() == index.has_value(), kOp, table.has_value() ? "bias_index" : "bias_table",
                 "must be given together with '", table.has_value() ? "bias_table" : "bias_index", "'");
  if (table.has_value()) {
    const at::Tensor& t = *table;
    check_float(t, kOp, "bias_table");
    check_same_device(qkv, t, kOp, "qkv", "bias_table");
    VF_CHECK_VALUE(t.dim() == 2 && t.size(0) == a.num_heads && t.size(1) >= 1, kOp, "bias_table",
                   "must be (num_heads, L) = (", a.num_heads, ", L); pass Swin's (L, heads) table transposed; got ",
                   t.sizes());
    const at::Tensor& ix = *index;
    check_dtype_in(ix, {at::kInt, at::kLong}, kOp, "bias_index");
    check_same_device(qkv, ix, kOp, "qkv", "bias_index");
    VF_CHECK_VALUE(ix.dim() == 2 && ix.size(0) == tokens && ix.size(1) == tokens, kOp, "bias_index",
                   "must be (tokens, tokens) = (", tokens, ", ", tokens, "), got ", ix.sizes());
    call.table = t;
    call.index = ix.contiguous();
    if (ix.is_cpu()) {  // CUDA kernels trap on an out-of-range entry instead of syncing here
      const auto mm = at::aminmax(call.index);
      const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
      VF_CHECK_VALUE(lo >= 0 && hi < t.size(1), kOp, "bias_index", "entries must lie in [0, ", t.size(1),
                     ") (the table's length), got [", lo, ", ", hi, "]");
    }
    p.table = call.table.data_ptr();
    p.table_dtype = to_kernel_dtype(t.scalar_type());
    p.table_stride_h = t.stride(0);
    p.table_stride_l = t.stride(1);
    p.table_len = t.size(1);
    p.index = call.index.data_ptr();
    p.index_int64 = ix.scalar_type() == at::kLong;
  }
  if (a.mask.has_value()) {
    const at::Tensor& m = *a.mask;
    check_float(m, kOp, "mask");
    check_same_device(qkv, m, kOp, "qkv", "mask");
    VF_CHECK_VALUE(m.dim() == 3 && m.size(0) >= 1 && m.size(1) == tokens && m.size(2) == tokens, kOp, "mask",
                   "must be (window types, tokens, tokens) with tokens = ", tokens, ", got ", m.sizes());
    if (grid) {
      VF_CHECK_VALUE(m.size(0) == g.windows_per_image(), kOp, "mask", "must hold one (tokens, tokens) mask per window ",
                     "of a feature map (", g.windows_per_image(), "), got ", m.size(0));
    } else {
      VF_CHECK_VALUE(p.windows % m.size(0) == 0, kOp, "mask", "window types (", m.size(0),
                     ") must divide the number of windows (", p.windows, ")");
    }
    call.mask = m.contiguous();
    p.mask = call.mask.data_ptr();
    p.mask_dtype = to_kernel_dtype(m.scalar_type());
    p.mask_windows = m.size(0);
  }
}

std::vector<int64_t> out_shape(const at::Tensor& qkv, int64_t channels) {
  std::vector<int64_t> s(qkv.sizes().begin(), qkv.sizes().end());
  s.back() = channels;
  return s;
}

}  // namespace

WindowAttentionCall prepare_window_attention_forward(const WindowAttentionArgs& a) {
  WindowAttentionCall call;
  check_layout(call, a);
  WindowAttentionParams& p = call.params.fwd;
  const bool grid = a.qkv.dim() == 4;
  call.out = at::empty(out_shape(a.qkv, a.num_heads * a.dim_v), a.qkv.options());
  call.lse = at::empty({p.windows, a.num_heads, p.tokens}, a.qkv.options().dtype(acc_type(a.qkv)));
  p.out = call.out.data_ptr();
  p.out_strides = strides_of(call.out, grid);
  p.lse = call.lse.data_ptr();
  return call;
}

WindowAttentionCall prepare_window_attention_backward(const WindowAttentionArgs& a, const at::Tensor& grad_out,
                                                      const at::Tensor& out, const at::Tensor& lse, bool table_grad) {
  const char* const kOp = a.op;
  WindowAttentionCall call;
  check_layout(call, a);
  WindowAttentionParams& p = call.params.fwd;
  const bool grid = a.qkv.dim() == 4;
  const auto shape = out_shape(a.qkv, a.num_heads * a.dim_v);
  if (out.defined()) {
    VF_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape) && out.scalar_type() == a.qkv.scalar_type(), kOp, "out",
                   "must be the forward's output: shape ", at::IntArrayRef(shape), " dtype ",
                   dtype_name(a.qkv.scalar_type()), ", got ", out.sizes(), " ", dtype_name(out.scalar_type()));
  }
  VF_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(shape), kOp, "grad_out", "must have the output's shape ",
                 at::IntArrayRef(shape), ", got ", grad_out.sizes());
  VF_CHECK_VALUE(lse.sizes() == at::IntArrayRef({p.windows, a.num_heads, p.tokens}) &&
                     lse.scalar_type() == acc_type(a.qkv),
                 kOp, "lse", "must be the forward's (windows, heads, tokens) ", dtype_name(acc_type(a.qkv)),
                 " log-sum-exp, got ", lse.sizes(), " ", dtype_name(lse.scalar_type()));
  check_same_device(a.qkv, grad_out, kOp, "qkv", "grad_out");
  check_same_device(a.qkv, lse, kOp, "qkv", "lse");
  // the kernels read out and grad_out with the output's (contiguous) strides
  call.grad_out = grad_out.to(a.qkv.scalar_type()).contiguous();
  if (out.defined()) {
    check_same_device(a.qkv, out, kOp, "qkv", "out");
    call.out = out.contiguous();
    p.out = call.out.data_ptr();
  }
  call.lse = lse.contiguous();
  p.out_strides = strides_of(call.grad_out, grid);
  p.lse = call.lse.data_ptr();
  call.params.grad_out = call.grad_out.data_ptr();
  // zero-filled only where q/k/v leave channels untouched
  call.grad_qkv = call.channels_covered ? at::empty(a.qkv.sizes(), a.qkv.options()) : at::zeros(a.qkv.sizes(), a.qkv.options());
  call.params.grad_qkv = call.grad_qkv.data_ptr();
  call.params.grad_qkv_strides = strides_of(call.grad_qkv, grid);
  if (table_grad && call.table.defined()) {
    call.dbias = at::zeros({a.num_heads, p.tokens, p.tokens}, a.qkv.options().dtype(acc_type(a.qkv)));
    call.params.dbias = call.dbias.data_ptr();
  }
  return call;
}

void attach_window_attention_bias_buffer(WindowAttentionCall& call) {
  WindowAttentionParams& p = call.params.fwd;
  const int64_t elements = window_attention_bias_elements(p);
  const at::ScalarType acc = p.dtype == DType::kFloat64 ? at::kDouble : at::kFloat;
  if (elements == 0 || elements * c10::elementSize(acc) > (int64_t{64} << 20)) return;
  call.bias_buffer = at::empty({elements}, call.qkv.options().dtype(acc));
  p.bias_buffer = call.bias_buffer.data_ptr();
}

at::Tensor window_attention_table_grad(const WindowAttentionCall& call, bool cuda_kernel, void* cuda_stream) {
  if (!call.dbias.defined()) return at::Tensor();
  const int64_t heads = call.dbias.size(0), nn = call.dbias.size(1) * call.dbias.size(2);
  const int64_t L = call.table.size(1);
  const at::Tensor flat = call.index.to(at::kLong).reshape({nn});
  const auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::Tensor bounds = at::searchsorted(std::get<0>(sorted), at::arange(L + 1, flat.options())).contiguous();
  const at::Tensor dbias = call.dbias.contiguous();
  at::Tensor grad = at::empty({heads, L}, dbias.options());
  const bool f64 = dbias.scalar_type() == at::kDouble;
  if (!cuda_kernel) {
    window_attention_segment_sum_cpu(dbias.data_ptr(), f64, order.data_ptr<int64_t>(), bounds.data_ptr<int64_t>(),
                                     heads, L, nn, grad.data_ptr());
  } else {
#if defined(VITFAST_WITH_CUDA) || defined(VITFAST_CUDA_EMULATION)
    const int err = window_attention_segment_sum_cuda(dbias.data_ptr(), f64, order.data_ptr<int64_t>(),
                                                      bounds.data_ptr<int64_t>(), heads, L, nn, grad.data_ptr(),
                                                      cuda_stream);
    TORCH_CHECK(err == 0, "vitfast.window_attention: table-gradient kernel failed (CUDA error ", err, ")");
#else
    TORCH_CHECK(false, "vitfast.window_attention: this build has no CUDA kernels");
#endif
  }
  return grad.to(call.table.scalar_type());
}

// VITFAST_NO_REGISTRATION: the glue alone, for the CUDA emulator's test binding
#ifndef VITFAST_NO_REGISTRATION
namespace {

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& qkv, const c10::optional<at::Tensor>& bias_table,
                                               const c10::optional<at::Tensor>& bias_index,
                                               const c10::optional<at::Tensor>& mask, int64_t num_heads,
                                               int64_t dim_k, int64_t dim_v, at::IntArrayRef offsets,
                                               int64_t head_stride, double scale, at::IntArrayRef window_size,
                                               at::IntArrayRef shift_size) {
  const WindowAttentionArgs args{qkv,   bias_table,  bias_index, mask,        num_heads, dim_k,
                                 dim_v, offsets,     head_stride, scale,      window_size, shift_size};
  WindowAttentionCall call = prepare_window_attention_forward(args);
  const WindowAttentionParams p = call.params.fwd;
  at::parallel_for(0, p.windows, 1, [&](int64_t b, int64_t e) { window_attention_forward_cpu(p, b, e); });
  return {call.out, call.lse};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                const at::Tensor& out, const at::Tensor& lse,
                                                const c10::optional<at::Tensor>& bias_table,
                                                const c10::optional<at::Tensor>& bias_index,
                                                const c10::optional<at::Tensor>& mask, int64_t num_heads,
                                                int64_t dim_k, int64_t dim_v, at::IntArrayRef offsets,
                                                int64_t head_stride, double scale, at::IntArrayRef window_size,
                                                at::IntArrayRef shift_size, bool table_grad) {
  const WindowAttentionArgs args{qkv,   bias_table,  bias_index, mask,        num_heads, dim_k,
                                 dim_v, offsets,     head_stride, scale,      window_size, shift_size};
  WindowAttentionCall call = prepare_window_attention_backward(args, grad_out, out, lse, table_grad);
  const WindowAttentionBackwardParams p = call.params;
  const int64_t windows = p.fwd.windows;
  if (!call.dbias.defined()) {
    at::parallel_for(0, windows, 1, [&](int64_t b, int64_t e) { window_attention_backward_cpu(p, b, e); });
  } else {
    // Fixed chunks, each with its own bias-gradient partial, summed in order: deterministic for a
    // given thread count. Partials are capped at ~256 MB.
    const int64_t per_chunk = call.dbias.numel() * call.dbias.element_size();
    const int64_t cap = std::max<int64_t>(1, (int64_t{256} << 20) / std::max<int64_t>(per_chunk, 1));
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({windows, at::get_num_threads(), cap}));
    at::Tensor partial = at::zeros({chunks, call.dbias.size(0), call.dbias.size(1), call.dbias.size(2)},
                                   call.dbias.options());
    char* partial_base = static_cast<char*>(partial.data_ptr());  // no tensor ops in the workers
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        WindowAttentionBackwardParams pc = p;
        pc.dbias = partial_base + c * per_chunk;
        window_attention_backward_cpu(pc, windows * c / chunks, windows * (c + 1) / chunks);
      }
    });
    call.dbias.copy_(partial.sum(0));
  }
  at::Tensor grad_table = window_attention_table_grad(call);
  return {call.grad_qkv, grad_table.defined() ? grad_table : at::empty({0}, qkv.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vitfast, CPU, m) {
  m.impl("window_attention_forward", &forward_cpu);
  m.impl("window_attention_backward", &backward_cpu);
}

#endif  // VITFAST_NO_REGISTRATION

}  // namespace vitfast
