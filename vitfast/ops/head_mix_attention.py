"""head_mix_attention: attention with per-layer transforms across heads, before and after the
softmax (MiniViT's weight transformation, CaiT's talking heads), fused -- no (B, H, N, N) tensor
in memory -- on the window-attention kernels' layouts (plain sequences, windows, feature maps with
Swin's shift, a relative-position bias table)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _ext
from ._checks import check_attention_args, check_mix_args, fail
from ._composite import composite_backward, warn_composite, wide
from .head_mix_sdpa import head_mix_attention_sdpa
from .reference import head_mix_attention_reference
from .window_attention import _acc, _windows_tokens, normalize_args

OP = "head_mix_attention"
ROUTE = "the SDPA route (impl='sdpa') in float32 or wider"


def _check(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads, dim_k, dim_v,
           offsets, head_stride, scale, window_size, shift_size, check_values=True) -> None:
    """The native checks, for the fallback path and for meta / traced (fake) tensors."""
    check_attention_args(OP, qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table, bias_index, mask,
                         window_size, shift_size, check_values)
    check_mix_args(OP, qkv, num_heads, pre_mix, pre_mix_bias, post_mix, post_mix_bias)

def _composite(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads, dim_k,
               dim_v, offsets, head_stride, scale, window_size, shift_size):
    """The SDPA route (differentiable) in float32 or wider, cast back to qkv's dtype: the route for
    shapes the fused kernels cannot hold."""
    # pre_mix_bias cancels in the softmax: the route keeps it in the graph with an exactly zero gradient
    return head_mix_attention_sdpa(wide(qkv), num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table,
                                   bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, window_size,
                                   shift_size).to(qkv.dtype)


if _ext.extension_loaded():

    @torch.library.register_fake("vitfast::head_mix_attention_forward")
    def _forward_fake(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads,
                      dim_k, dim_v, offsets, head_stride, scale, window_size, shift_size):
        _check(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads, dim_k,
               dim_v, offsets, head_stride, scale, window_size, shift_size)
        windows, tokens = _windows_tokens(qkv, window_size)
        out = qkv.new_empty((*qkv.shape[:-1], num_heads * dim_v))
        lse = qkv.new_empty((windows, num_heads, tokens), dtype=_acc(qkv.dtype))
        return out, lse

    @torch.library.register_fake("vitfast::head_mix_attention_backward")
    def _backward_fake(grad_out, qkv, lse, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix,
                       post_mix_bias, num_heads, dim_k, dim_v, offsets, head_stride, scale, window_size, shift_size,
                       table_grad, mix_grad):
        grad_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        empty = qkv.new_empty((0,))

        def like(t, wanted):
            return t.new_empty(t.shape) if wanted and t is not None else empty

        return (grad_qkv, like(bias_table, table_grad), like(pre_mix, mix_grad), like(post_mix, mix_grad),
                like(post_mix_bias, mix_grad))

    def _setup_context(ctx, inputs, output):
        qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias = inputs[:8]
        _, lse = output
        ctx.save_for_backward(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, lse)
        ctx.args = inputs[8:]
        ctx.mark_non_differentiable(lse)

    def _backward(ctx, grad_out, _grad_lse):
        qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        table_grad = bias_table is not None and need[1]
        mix_grad = (pre_mix is not None and need[4]) or (post_mix is not None and need[6]) or \
            (post_mix_bias is not None and need[7])
        if not (need[0] or table_grad or mix_grad or (pre_mix_bias is not None and need[5])):
            return (None,) * 16
        num_heads, dim_k, dim_v = ctx.args[:3]
        if not _ext.head_mix_fits(qkv.device, qkv.dtype, num_heads, dim_k, dim_v, mix_grad, table_grad)[1]:
            warn_composite(OP, "backward", qkv, num_heads, dim_k, dim_v, ROUTE)
            return _composite_backward(ctx, grad_out, need)
        grad_qkv, g_table, g_pre, g_post, g_post_bias = torch.ops.vitfast.head_mix_attention_backward(
            grad_out, qkv, lse, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias,
            *ctx.args, table_grad, mix_grad)
        # a bias before the softmax shifts every score of a row equally: its gradient is exactly zero
        g_pre_bias = torch.zeros_like(pre_mix_bias) if pre_mix_bias is not None and need[5] else None
        return (grad_qkv if need[0] else None, g_table if table_grad else None, None, None,
                g_pre if pre_mix is not None and need[4] else None, g_pre_bias,
                g_post if post_mix is not None and need[6] else None,
                g_post_bias if post_mix_bias is not None and need[7] else None) + (None,) * 8

    def _composite_backward(ctx, grad_out, need):
        """Gradients through the composite (the forward ran fused; only the backward does not fit)."""
        wants = [need[0], need[1], False, False, need[4], False, need[6], need[7]]
        result = composite_backward(_composite, list(ctx.saved_tensors[:8]), ctx.args, grad_out, wants)
        saved_pre_bias = ctx.saved_tensors[5]
        if saved_pre_bias is not None and need[5]:
            result[5] = torch.zeros_like(saved_pre_bias)  # cancels in the softmax
        return tuple(result) + (None,) * 8

    torch.library.register_autograd("vitfast::head_mix_attention_forward", _backward, setup_context=_setup_context)


IMPLS = ("auto", "fused", "sdpa")
# auto: windows longer than this run the SDPA route on CUDA (see head_mix_attention's impl)
AUTO_SDPA_MIN_TOKENS = 65
# head counts and widest head dim of the streaming forward kernel (csrc/window_attention/head_mix_stream_rule.h)
STREAM_HEADS = (3, 4, 6, 8, 12)
STREAM_MAX_HEAD_DIM = 64


def auto_impl(qkv: torch.Tensor, window_size, num_heads: int = 0, dim_k: int = 0, dim_v: int = 0,
              needs_grad: bool = True) -> str:
    """impl="auto": "sdpa" for CUDA windows of more than 64 tokens, where the fused tile kernels
    measured slower than eager talking heads (H100, DeiT-S/B shapes: benchmarks/NOTES.md), except
    without gradients (inference) in fp16/bf16 with 3/4/6/8/12 heads of <= 64 channels: there the
    fused op's forward is the streaming register kernel (head_mix_stream.cuh), which reads q, k, v
    once per 64 query rows instead of SDPA's H calls at H x the head dim. "fused" elsewhere."""
    if qkv.device.type != "cuda":
        return "fused"
    tokens = window_size[0] * window_size[1] if qkv.dim() == 4 else qkv.shape[1]
    if tokens < AUTO_SDPA_MIN_TOKENS:
        return "fused"
    if needs_grad:
        return "sdpa"
    # the shape rule here (cheap, and what the CPU tests check), the GPU's word after it (sm_80+, shared memory)
    stream = (qkv.dtype in (torch.float16, torch.bfloat16) and num_heads in STREAM_HEADS
              and max(dim_k, dim_v) <= STREAM_MAX_HEAD_DIM)
    return "fused" if stream and _ext.head_mix_stream_fits(qkv.device, qkv.dtype, num_heads, dim_k, dim_v) else "sdpa"


def head_mix_attention(
    qkv: torch.Tensor,
    num_heads: int,
    dim_k: int,
    dim_v: int | None = None,
    *,
    pre_mix: torch.Tensor | None = None,
    pre_mix_bias: torch.Tensor | None = None,
    post_mix: torch.Tensor | None = None,
    post_mix_bias: torch.Tensor | None = None,
    layout="swin",
    scale: float | None = None,
    bias_table: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    window_size: Sequence[int] | None = None,
    shift_size: Sequence[int] = (0, 0),
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-head attention whose heads talk to each other, fused (forward and backward).

    Per window (a whole sequence is one window), for heads g, h:
        S_h   = scale * q_h k_h^T + bias_table[h, bias_index]
        S'_g  = sum_h pre_mix[g, h] S_h + pre_mix_bias[g] + mask[w % mask.shape[0]]
        out_g = (sum_h post_mix[g, h] softmax(S'_h) + post_mix_bias[g]) v_g

    Args:
        qkv, num_heads, dim_k, dim_v, layout, scale, bias_table, bias_index, mask, window_size,
            shift_size: as in `window_attention` (qkv straight from the qkv linear; (windows, N, C)
            or a (B, H, W, C) feature map cut into windows with Swin's cyclic shift).
        pre_mix, post_mix: (num_heads, num_heads) transforms, before and after the softmax
            (timm CaiT's `proj_l.weight`, `proj_w.weight`; a missing one is the identity).
        pre_mix_bias, post_mix_bias: (num_heads,) biases (`proj_l.bias`, `proj_w.bias`). The
            bias before the softmax cancels in it: accepted for drop-in use, its gradient is zero.
        The shift mask is added after the pre-softmax mix (Mini-Swin's order).
        impl: "fused" (vitfast's kernels; the PyTorch reference where the extension is missing)
            or "sdpa": the same computation as H calls' worth of F.scaled_dot_product_attention
            with the mixes folded into queries of H * dim_k channels and values of H * dim_v
            (`vitfast.ops.head_mix_sdpa`; no (B, H, N, N) tensor when SDPA picks a fused backend,
            ~H times SDPA's FLOPs). Which is faster depends on the shape and the GPU:
            `benchmarks/head_mix_cases.py` times both. "auto" (default): "sdpa" for CUDA windows
            of more than 64 tokens (DeiT / CaiT sequences, where the fused tile kernels measured
            2-4x slower than even eager talking heads on the H100: 8.05 vs 4.17 ms at DeiT-S, 25.1
            vs 6.1 ms at DeiT-B; benchmarks/RESULTS.md) when gradients are wanted; without them
            (inference, torch.no_grad) in fp16/bf16 with 3, 4, 6, 8 or 12 heads of <= 64 channels
            "fused", whose forward is then the streaming register kernel; "fused" elsewhere (CPU;
            Mini-Swin's 7 x 7 windows).

    Every float parameter may have its own dtype (float32 parameters under autocast); their
    gradients are summed in float32 (float64 for float64 inputs) in a fixed order, so they are
    bitwise reproducible. Up to 32 heads, head dims 1..256, N up to 4096 tokens per window. On
    CUDA, shapes whose heads do not fit one block's shared memory (float32 / float64 with many or
    wide heads) run the float32-or-wider PyTorch composite, with a RuntimeWarning once per shape.
    Returns (..., num_heads * dim_v) with qkv's leading shape.
    """
    if impl not in IMPLS:
        fail(ValueError, OP, "impl", f"must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    dim_v, offsets, head_stride, scale, window_size, shift_size = normalize_args(
        OP, qkv, num_heads, dim_k, dim_v, layout, scale, window_size, shift_size)
    if impl == "auto":
        tensors = (qkv, bias_table, pre_mix, pre_mix_bias, post_mix, post_mix_bias)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        impl = auto_impl(qkv, window_size, num_heads, dim_k, dim_v, needs_grad)
    if impl == "sdpa":
        # bias_index's range is checked on the CPU only (on CUDA it would cost a sync per call; an
        # index out of range trips the gather's device-side assert there)
        _check(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads, dim_k,
               dim_v, offsets, head_stride, scale, window_size, shift_size, qkv.device.type == "cpu")
        return head_mix_attention_sdpa(qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table,
                                       bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, window_size,
                                       shift_size)
    if _ext.native(qkv.device) and not _ext.head_mix_fits(qkv.device, qkv.dtype, num_heads, dim_k, dim_v, False,
                                                           False)[0]:
        warn_composite(OP, "forward", qkv, num_heads, dim_k, dim_v, ROUTE)
        _check(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads, dim_k,
               dim_v, offsets, head_stride, scale, window_size, shift_size)
        return _composite(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads,
                          dim_k, dim_v, offsets, head_stride, scale, window_size, shift_size)
    if _ext.native(qkv.device):
        out, _ = torch.ops.vitfast.head_mix_attention_forward(
            qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads, dim_k,
            dim_v, offsets, head_stride, scale, window_size, shift_size)
        return out
    _ext.warn_fallback(OP, qkv.device)
    _check(qkv, bias_table, bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias, num_heads, dim_k, dim_v,
           offsets, head_stride, scale, window_size, shift_size)
    return head_mix_attention_reference(qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table,
                                        bias_index, mask, pre_mix, pre_mix_bias, post_mix, post_mix_bias,
                                        window_size, shift_size)
