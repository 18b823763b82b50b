"""Pure-PyTorch references: the specification of every vitfast op.

The compiled kernels must agree with these (tests compare in float64); they are also the fallback
path when the extension is missing. Both follow the exact same rules as the kernels.
"""
from __future__ import annotations

import torch


def topk_indices_dtype(num_classes: int) -> torch.dtype:
    """int16 while every class index fits in it (C <= 32768), else int32."""
    return torch.int16 if num_classes <= 32768 else torch.int32


def topk_softmax_reference(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    values_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of softmax(logits / temperature) per row, sorted descending.

    * Order is decided on the raw logits: larger first, equal logits by lower class index
      (-0.0 and +0.0 are equal).
    * A row holding NaN or +inf, or only -inf, has no softmax: values NaN, indices 0..k-1.
    * values in float16 unless values_dtype=torch.float32; indices int16 if C <= 32768, else int32.
    """
    lead, num_classes = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, num_classes).to(compute_dtype) + 0.0  # + 0.0 folds -0.0 onto +0.0
    rows = x.shape[0]
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
    probs = torch.softmax(x / temperature, dim=-1)
    values = probs.gather(-1, order)
    bad = torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)
    values = torch.where(bad[:, None], torch.full_like(values, float("nan")), values)
    order = torch.where(bad[:, None], torch.arange(k, device=x.device).expand(rows, k), order)
    values = values.to(values_dtype or torch.float16).reshape(*lead, k)
    return values, order.to(topk_indices_dtype(num_classes)).reshape(*lead, k)


def check_sparse_indices(indices: torch.Tensor, num_classes: int) -> None:
    """The rule the kernels enforce: every row lists distinct classes in [0, num_classes)."""
    idx = indices.long()
    bad = (idx < 0) | (idx >= num_classes)
    srt = idx.sort(-1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(-1) if idx.shape[1] > 1 else torch.zeros_like(bad[:, 0])
    rows = (bad.any(-1) | dup).nonzero().flatten()
    if rows.numel():
        raise ValueError(
            f"vitfast.sparse_soft_target_cross_entropy: argument 'indices' row {int(rows[0])} has an entry out "
            "of [0, classes) or a duplicate; each row must list distinct classes")


def sparse_soft_target_dense(
    values: torch.Tensor, indices: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The dense target the fused op never builds: stored top-k mass at its classes, the rest
    (1 - sum(values)) spread evenly over the other C - k classes (0 if k == C)."""
    v = values.to(dtype)
    k = v.shape[1]
    if num_classes > k:
        rest = (1.0 - v.sum(-1, keepdim=True)) / (num_classes - k)
    else:
        rest = torch.zeros_like(v[:, :1])
    target = rest.expand(v.shape[0], num_classes).clone()
    return target.scatter(1, indices.long(), v)


def sparse_soft_target_cross_entropy_reference(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    num_classes: int,
    reduction: str = "mean",
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """-sum_j target_j * log_softmax(student_logits)_j per row (differentiable in the logits)."""
    check_sparse_indices(indices, num_classes)
    x = student_logits.to(compute_dtype)
    target = sparse_soft_target_dense(values, indices, num_classes, compute_dtype)
    loss = -(target * torch.log_softmax(x, dim=-1)).sum(-1)
    return reduce_loss(loss, reduction)


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
