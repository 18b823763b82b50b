"""topk_softmax: the teacher side of TinyViT's logit store."""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_topk_args, fail
from .reference import topk_indices_dtype, topk_softmax_reference

if _ext.extension_loaded():

    @torch.library.register_fake("vitfast::topk_softmax")
    def _topk_softmax_fake(logits, k, temperature=1.0, values_dtype=None):
        check_topk_args(logits, k, temperature, values_dtype)
        rows, classes = logits.shape
        values = logits.new_empty((rows, k), dtype=values_dtype or torch.float16)
        indices = logits.new_empty((rows, k), dtype=topk_indices_dtype(classes))
        return values, indices

    def _setup_context(ctx, inputs, output):
        logits, _k, temperature, _values_dtype = inputs
        ctx.save_for_backward(logits, output[1])
        ctx.temperature = temperature
        ctx.mark_non_differentiable(output[1])

    def _backward(ctx, grad_values, _grad_indices):
        """d p_i / d x_l = p_i (delta_il - p_l) / T for the selected p_i = softmax(x / T)_i, in
        float32 from the saved logits (the stored values are only float16)."""
        logits, indices = ctx.saved_tensors
        p = torch.softmax(logits.float() / ctx.temperature, -1)
        idx = indices.long()
        gv = grad_values.float() * p.gather(-1, idx)
        grad = torch.zeros_like(p).scatter_add_(-1, idx, gv) - p * gv.sum(-1, keepdim=True)
        return (grad / ctx.temperature).to(logits.dtype), None, None, None

    torch.library.register_autograd("vitfast::topk_softmax", _backward, setup_context=_setup_context)


def topk_softmax(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    values_dtype: torch.dtype | None = None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of softmax(logits / temperature) along the last dim, in one fused pass.

    Args:
        logits: (..., C) float16, bfloat16 or float32; any leading dims; 1 <= C < 2^31.
        k: 1 <= k <= min(C, 2048).
        temperature: > 0 and at least ~3e-39 (1 / temperature must fit a float32).
        values_dtype: torch.float16 (default, TinyViT's storage) or torch.float32.
        check_finite: raise ValueError if any row had NaN/+inf or only -inf logits (costs a
            device sync); otherwise such rows come back as NaN values with indices 0..k-1.

    Returns:
        (values, indices), each (..., k), sorted by descending probability; equal logits are
        ordered by lower class index. indices are int16 when C <= 32768, else int32. values are
        differentiable in the logits (d softmax, from the logits in float32), on every path.
    """
    if logits.dim() == 0 or logits.shape[-1] == 0:
        fail(ValueError, "topk_softmax", "logits", f"must have a class dim of 1 or more classes (..., classes), got "
             f"shape {list(logits.shape)}")
    lead = logits.shape[:-1]
    x = logits.reshape(-1, logits.shape[-1]) if logits.dim() != 2 else logits
    if _ext.native(x.device):
        values, indices = torch.ops.vitfast.topk_softmax(x, k, float(temperature), values_dtype)
    else:
        _ext.warn_fallback("topk_softmax", x.device)
        check_topk_args(x, k, temperature, values_dtype)
        compute = torch.float64 if x.device.type == "cpu" else torch.float32
        values, indices = topk_softmax_reference(x, k, temperature, values_dtype, compute)
    if check_finite:
        bad = torch.isnan(values).any(-1).nonzero().flatten()
        if bad.numel():
            raise ValueError(
                f"vitfast.topk_softmax: argument 'logits' has {bad.numel()} row(s) with NaN/+inf or only -inf "
                f"(first rows: {bad[:8].tolist()})")
    if logits.dim() != 2:
        values, indices = values.reshape(*lead, k), indices.reshape(*lead, k)
    return values, indices
