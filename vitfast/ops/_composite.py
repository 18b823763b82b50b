"""The route for attention shapes the fused CUDA kernels cannot hold (a block holds every head of a
window, or a whole head's tiles: float32 / float64 with many or wide heads can exceed a block's
shared memory): scaled_dot_product_attention in float32 or wider (vitfast.ops.head_mix_sdpa),
with one warning per shape."""
from __future__ import annotations

import warnings

import torch

_warned: set[tuple] = set()


def warn_composite(op: str, what: str, qkv: torch.Tensor, num_heads: int, dim_k: int, dim_v: int,
                   route: str) -> None:
    key = (op, what, qkv.dtype, num_heads, dim_k, dim_v)
    if key in _warned:
        return
    _warned.add(key)
    # the hint must be true for the call at hand: in 16 bits only fewer or narrower heads help
    # (e.g. 24 heads of 32 have a fused forward but no fused backward, 32 heads neither)
    hint = ("fewer or narrower heads run fused" if qkv.dtype in (torch.float16, torch.bfloat16)
            else "16-bit inputs (autocast) or fewer / narrower heads run fused")
    warnings.warn(
        f"vitfast.{op}: the fused CUDA {what} for {str(qkv.dtype).removeprefix('torch.')} with {num_heads} heads "
        f"(dim_k {dim_k}, dim_v {dim_v}) needs more shared memory per block than this GPU has; this shape runs "
        f"{route} (a composite). {hint}.", RuntimeWarning, stacklevel=4)


def wide(qkv: torch.Tensor) -> torch.Tensor:
    """qkv in float32 or wider (the composite's compute dtype)."""
    return qkv if qkv.dtype in (torch.float32, torch.float64) else qkv.float()


def composite_backward(forward, saved, args, grad_out, wants):
    """Gradients of `forward(*saved, *args)` for the saved inputs flagged in `wants` (None
    elsewhere), by autograd through the composite: the route when only the backward does not fit."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None and w else t for t, w in zip(saved, wants)]
        out = forward(*leaves, *args)
        wanted = [i for i, (t, w) in enumerate(zip(leaves, wants)) if t is not None and w]
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out, allow_unused=True)
    result = [None] * len(saved)
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(leaves[i])
    return result
