"""sparse_soft_target_cross_entropy: the student side of TinyViT's distillation."""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_soft_target_args, fail
from .reference import reduce_loss, sparse_soft_target_cross_entropy_reference

REDUCTIONS = ("mean", "sum", "none")


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


if _ext.extension_loaded():

    @torch.library.register_fake("vitfast::sparse_soft_target_ce_forward")
    def _forward_fake(logits, values, indices, num_classes):
        check_soft_target_args(logits, values, indices, num_classes)
        rows = logits.shape[0]
        acc = _acc_dtype(logits)
        return logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=torch.float64)

    @torch.library.register_fake("vitfast::sparse_soft_target_ce_backward")
    def _backward_fake(grad_loss, logits, values, indices, lse):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # autograd: a C++ kernel (csrc/soft_target_ce/soft_target_ce_autograd.cpp) -- a Python wrapper
    # cost several times the op itself on the host, once per training step


def sparse_soft_target_cross_entropy(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    num_classes: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of the student against a stored sparse teacher distribution (TinyViT).

    The target is the teacher's top-k probabilities `values` at `indices`, with the remaining
    mass 1 - sum(values) spread evenly over the other C - k classes. Forward and backward are
    fused kernels that never build the dense (B, C) target; the gradient w.r.t. the logits is
    sum(target) * softmax(student) - target.

    Args:
        student_logits: (B, C) float16/bfloat16/float32/float64.
        values: (B, k) teacher probabilities, any float dtype (not differentiated).
        indices: (B, k) int16/int32/int64, distinct classes per row in [0, C) (checked).
        num_classes: C; defaults to student_logits.shape[1] and must equal it.
        reduction: "mean" | "sum" | "none".

    Returns the loss in float32 (float64 for float64 logits).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"vitfast.sparse_soft_target_cross_entropy: argument 'reduction' must be one of {REDUCTIONS}, "
            f"got {reduction!r}")
    if num_classes is None:
        if student_logits.dim() != 2:
            fail(ValueError, "sparse_soft_target_cross_entropy", "student_logits",
                 f"must be 2-D (batch, classes), got shape {list(student_logits.shape)}")
        num_classes = student_logits.shape[-1]
    if _ext.native(student_logits.device):
        loss, _ = torch.ops.vitfast.sparse_soft_target_ce_forward(student_logits, values, indices, num_classes)
        return reduce_loss(loss, reduction)
    _ext.warn_fallback("sparse_soft_target_cross_entropy", student_logits.device)
    check_soft_target_args(student_logits, values, indices, num_classes)
    loss = sparse_soft_target_cross_entropy_reference(
        student_logits, values, indices, num_classes, "none", _acc_dtype(student_logits))
    return reduce_loss(loss, reduction)
