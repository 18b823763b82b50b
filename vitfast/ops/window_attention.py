"""window_attention: Swin / TinyViT windowed attention with a gathered relative-position bias,
fused (forward and backward) and reading q, k, v straight from the qkv linear's output."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _ext
from ._checks import ATTN_MAX_HEAD_DIM, check_attention_args, fail
from ._composite import composite_backward, warn_composite, wide
from .head_mix_sdpa import head_mix_attention_sdpa
from .reference import window_attention_reference

OP = "window_attention"
ROUTE = "scaled_dot_product_attention with the bias, in float32 or wider"


def qkv_layout(layout, num_heads: int, dim_k: int, dim_v: int) -> tuple[list[int], int]:
    """(offsets [q, k, v], head_stride) of head 0 in the qkv channels.

    "swin": channels are (3, heads, d) -- timm's Swin / ViT `qkv.reshape(B, N, 3, H, d)`.
    "tinyvit": channels are (heads, dim_k + dim_k + dim_v) -- timm's TinyViT / LeViT.
    Or an explicit (q_offset, k_offset, v_offset, head_stride).
    """
    if layout == "swin":
        if dim_k != dim_v:
            fail(ValueError, OP, "layout", f"'swin' packs equal q/k/v head dims, got dim_k={dim_k}, dim_v={dim_v}")
        return [0, num_heads * dim_k, 2 * num_heads * dim_k], dim_k
    if layout == "tinyvit":
        return [0, dim_k, 2 * dim_k], 2 * dim_k + dim_v
    if isinstance(layout, (tuple, list)) and len(layout) == 4:
        return [int(v) for v in layout[:3]], int(layout[3])
    fail(ValueError, OP, "layout", f"must be 'swin', 'tinyvit' or (q_off, k_off, v_off, head_stride), got {layout!r}")


def normalize_args(op: str, qkv, num_heads: int, dim_k: int, dim_v, layout, scale, window_size, shift_size):
    """(dim_v, offsets, head_stride, scale, window_size, shift_size) as the ops take them."""
    dim_v = dim_k if dim_v is None else dim_v
    # the sizes the defaults below are computed from, named before they are used
    if num_heads < 1:
        fail(ValueError, op, "num_heads", f"must be >= 1, got {num_heads}")
    for arg, d in (("dim_k", dim_k), ("dim_v", dim_v)):
        if not 1 <= d <= ATTN_MAX_HEAD_DIM:
            fail(ValueError, op, arg, f"must lie in [1, {ATTN_MAX_HEAD_DIM}], got {d}")
    offsets, head_stride = qkv_layout(layout, num_heads, dim_k, dim_v)
    if isinstance(layout, str) and qkv.dim() >= 1:
        # a named layout packs q, k, v of every head densely: other channel counts mean wrong heads/dims
        per_head = 3 * dim_k if layout == "swin" else 2 * dim_k + dim_v
        if qkv.shape[-1] != num_heads * per_head:
            fail(ValueError, op, "num_heads", f"{num_heads} heads x {per_head} channels (layout {layout!r}, dim_k "
                 f"{dim_k}, dim_v {dim_v}) = {num_heads * per_head} must equal qkv's {qkv.shape[-1]} channels "
                 "(pass an explicit (q_off, k_off, v_off, head_stride) layout to leave channels unused)")
    scale = dim_k ** -0.5 if scale is None else float(scale)
    if qkv.dim() == 4:
        if window_size is None:
            fail(ValueError, op, "window_size", "is required for a (B, H, W, C) feature map")
        window_size, shift_size = [int(v) for v in window_size], [int(v) for v in shift_size]
    else:
        window_size, shift_size = [], []
    return dim_v, offsets, head_stride, scale, window_size, shift_size


def _windows_tokens(qkv, window_size) -> tuple[int, int]:
    if qkv.dim() == 4:
        wh, ww = window_size
        return qkv.shape[0] * (qkv.shape[1] // wh) * (qkv.shape[2] // ww), wh * ww
    return qkv.shape[0], qkv.shape[1]


def _composite(qkv, bias_table, bias_index, mask, num_heads, dim_k, dim_v, offsets, head_stride, scale, window_size,
               shift_size):
    """Shapes the fused kernels cannot hold: scaled_dot_product_attention with the bias (head_mix's
    SDPA route without mixes) in float32 or wider, cast back."""
    return head_mix_attention_sdpa(wide(qkv), num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table,
                                   bias_index, mask, window_size=window_size, shift_size=shift_size).to(qkv.dtype)


# The register kernels' limits (csrc/window_attention/window_attention_reg.cuh; a CUDA test checks
# that _ext.window_attention_route agrees): 16-bit, <= 64 tokens, head dims <= 64.
REGISTER_MAX_TOKENS = 64
REGISTER_MAX_HEAD_DIM = 64
IMPLS = ("auto", "fused", "sdpa")


def auto_impl(qkv: torch.Tensor, dim_k: int, dim_v: int, window_size) -> str:
    """impl="auto": the fused kernels, except for 16-bit CUDA windows the register kernels do not
    take (more than 64 tokens or head dims over 64), which run on SDPA: there the tile kernels
    measured 4.5x slower than SDPA with a materialised bias (H100, TinyViT-21M stage 3, N196:
    5.92 vs 1.32 ms fwd+bwd; benchmarks/RESULTS.md)."""
    if qkv.device.type != "cuda" or qkv.dtype not in (torch.float16, torch.bfloat16):
        return "fused"
    tokens = window_size[0] * window_size[1] if qkv.dim() == 4 else qkv.shape[1]
    small = tokens <= REGISTER_MAX_TOKENS and max(dim_k, dim_v) <= REGISTER_MAX_HEAD_DIM
    return "fused" if small else "sdpa"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _ext.extension_loaded():

    @torch.library.register_fake("vitfast::window_attention_forward")
    def _forward_fake(qkv, bias_table, bias_index, mask, num_heads, dim_k, dim_v, offsets, head_stride, scale,
                      window_size, shift_size):
        # meta tensors and torch.compile's tracing refuse what the kernels refuse
        check_attention_args(OP, qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table, bias_index,
                             mask, window_size, shift_size)
        windows, tokens = _windows_tokens(qkv, window_size)
        out = qkv.new_empty((*qkv.shape[:-1], num_heads * dim_v))
        lse = qkv.new_empty((windows, num_heads, tokens), dtype=_acc(qkv.dtype))
        return out, lse

    @torch.library.register_fake("vitfast::window_attention_backward")
    def _backward_fake(grad_out, qkv, out, lse, bias_table, bias_index, mask, num_heads, dim_k, dim_v, offsets,
                       head_stride, scale, window_size, shift_size, table_grad):
        grad_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        if table_grad and bias_table is not None:
            grad_table = bias_table.new_empty(bias_table.shape)
        else:
            grad_table = qkv.new_empty((0,))
        return grad_qkv, grad_table

    def _setup_context(ctx, inputs, output):
        qkv, bias_table, bias_index, mask = inputs[:4]
        out, lse = output
        ctx.save_for_backward(qkv, bias_table, bias_index, mask, out, lse)
        ctx.args = inputs[4:]
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, _grad_lse):
        qkv, bias_table, bias_index, mask, out, lse = ctx.saved_tensors
        table_grad = bias_table is not None and ctx.needs_input_grad[1]
        if not (ctx.needs_input_grad[0] or table_grad):
            return (None,) * 12
        num_heads, dim_k, dim_v = ctx.args[:3]
        if not _ext.window_attention_fits(qkv.device, qkv.dtype, num_heads, dim_k, dim_v, table_grad)[1]:
            warn_composite(OP, "backward", qkv, num_heads, dim_k, dim_v, ROUTE)
            wants = [ctx.needs_input_grad[0], table_grad, False, False]
            result = composite_backward(_composite, [qkv, bias_table, bias_index, mask], ctx.args, grad_out, wants)
            return tuple(result[:2]) + (None,) * 10
        grad_qkv, grad_table = torch.ops.vitfast.window_attention_backward(
            grad_out, qkv, out, lse, bias_table, bias_index, mask, *ctx.args, table_grad)
        return (grad_qkv if ctx.needs_input_grad[0] else None, grad_table if table_grad else None) + (None,) * 10

    torch.library.register_autograd("vitfast::window_attention_forward", _backward, setup_context=_setup_context)


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    dim_k: int,
    dim_v: int | None = None,
    *,
    layout="swin",
    scale: float | None = None,
    bias_table: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    window_size: Sequence[int] | None = None,
    shift_size: Sequence[int] = (0, 0),
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-head attention inside windows with a relative-position bias table, fused.

    out = softmax(scale * q k^T + bias_table[h, bias_index] + mask[w % mask.shape[0]]) v

    Args:
        qkv: the qkv linear's output, last dim unit stride (other strides free):
            (windows, N, C) for windows already cut out, or a feature map (B, H, W, C) that the
            kernel cuts into `window_size` windows itself after a cyclic shift by `shift_size`
            (Swin's torch.roll(x, -shift)); window partition, reverse and shift are then index
            arithmetic, not copies, and the output comes back as a (B, H, W, heads*dim_v) map.
        num_heads, dim_k, dim_v: heads and q/k and v head dims (dim_v defaults to dim_k;
            TinyViT's attn_ratio makes them differ). Head dims 1..256, N up to 4096 tokens. On
            CUDA, shapes whose tiles do not fit a block's shared memory (float64 with wide
            heads) run the float32-or-wider PyTorch composite, with a RuntimeWarning once.
        layout: where each head's q, k, v sit in the channels: "swin" (3, heads, d), "tinyvit"
            (heads, 2*dim_k + dim_v) or (q_offset, k_offset, v_offset, head_stride).
        scale: defaults to dim_k ** -0.5.
        bias_table, bias_index: (heads, L) table (any strides: pass Swin's (L, heads)
            `relative_position_bias_table.t()`) and (N, N) int64/int32 index into L. The table
            gets a gradient (accumulated in float32, deterministic).
        mask: (types, N, N) additive mask; window w uses mask[w % types] (Swin's shifted-window
            mask, types = windows per image). No gradient.
        impl: "fused" (vitfast's kernels: on CUDA, register-resident ones for 16-bit windows of
            <= 64 tokens and head dims <= 64, shared-memory tiles otherwise), "sdpa"
            (F.scaled_dot_product_attention with the gathered bias, in qkv's dtype; the shift
            mask broadcast, not copied per window) or "auto" (default: "fused", except "sdpa"
            for 16-bit CUDA shapes outside the register kernels, where it measured faster).

    Returns (..., num_heads * dim_v) with qkv's leading shape, channels ordered (head, dim_v):
    what the projection after attention takes. fp16/bf16/fp32/fp64; table and mask may have
    another float dtype (e.g. float32 parameters under autocast).
    """
    if impl not in IMPLS:
        fail(ValueError, OP, "impl", f"must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    dim_v, offsets, head_stride, scale, window_size, shift_size = normalize_args(
        OP, qkv, num_heads, dim_k, dim_v, layout, scale, window_size, shift_size)
    if impl == "auto":
        impl = auto_impl(qkv, dim_k, dim_v, window_size)
    if impl == "sdpa":
        # bias_index's range is checked on the CPU only (on CUDA it would cost a sync per call; an
        # index out of range trips the gather's device-side assert there)
        check_attention_args(OP, qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table, bias_index,
                             mask, window_size, shift_size, check_values=qkv.device.type == "cpu")
        return head_mix_attention_sdpa(qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table,
                                       bias_index, mask, window_size=window_size, shift_size=shift_size)
    if _ext.native(qkv.device) and not _ext.window_attention_fits(qkv.device, qkv.dtype, num_heads, dim_k, dim_v,
                                                                  False)[0]:
        warn_composite(OP, "forward", qkv, num_heads, dim_k, dim_v, ROUTE)
        check_attention_args(OP, qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table, bias_index,
                             mask, window_size, shift_size)
        return _composite(qkv, bias_table, bias_index, mask, num_heads, dim_k, dim_v, offsets, head_stride, scale,
                          window_size, shift_size)
    if _ext.native(qkv.device):
        out, _ = torch.ops.vitfast.window_attention_forward(
            qkv, bias_table, bias_index, mask, num_heads, dim_k, dim_v, offsets, head_stride, scale,
            window_size, shift_size)
        return out
    _ext.warn_fallback(OP, qkv.device)
    check_attention_args(OP, qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table, bias_index, mask,
                         window_size, shift_size)
    return window_attention_reference(qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table,
                                      bias_index, mask, window_size, shift_size)
