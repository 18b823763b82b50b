"""dense_soft_target_cross_entropy: knowledge distillation against dense teacher logits, and the
row-wise core of MiniViT's relation losses."""
from __future__ import annotations

import math

import torch

from .. import _ext
from ._checks import FLOATS, check_dtype, fail
from .reference import dense_soft_target_cross_entropy_reference, reduce_loss

OP = "dense_soft_target_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


def check_dense_soft_ce_args(student, teacher, student_scale, teacher_scale) -> None:
    """The C++ glue's checks, worded the same (fake kernel and fallback path)."""
    if student.dim() != 2:
        fail(ValueError, OP, "student_logits", f"must be 2-D (rows, classes), got shape {list(student.shape)}")
    check_dtype(student, FLOATS, OP, "student_logits")
    check_dtype(teacher, FLOATS, OP, "teacher_logits")
    if teacher.device != student.device:
        fail(ValueError, OP, "teacher_logits",
             f"must be on the same device as 'student_logits' ({student.device}), got {teacher.device}")
    if teacher.shape != student.shape:
        fail(ValueError, OP, "teacher_logits",
             f"must have the shape of 'student_logits' {list(student.shape)}, got {list(teacher.shape)}")
    if not 1 <= student.shape[1] <= 2**31 - 1:
        fail(ValueError, OP, "student_logits", f"must have between 1 and 2^31-1 classes, got {student.shape[1]}")
    for name, v in (("student_scale", student_scale), ("teacher_scale", teacher_scale)):
        if not (math.isfinite(v) and v > 0):
            fail(ValueError, OP, name, f"must be finite and > 0, got {v}")


def _loss_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


if _ext.extension_loaded():

    @torch.library.register_fake("vitfast::dense_soft_target_ce")
    def _fake(student, teacher, student_scale=1.0, teacher_scale=1.0, want_grad=False):
        check_dense_soft_ce_args(student, teacher, student_scale, teacher_scale)
        loss = student.new_empty((student.shape[0],), dtype=_loss_dtype(student, teacher))
        grad = student.new_empty(student.shape) if want_grad else student.new_empty((0,))
        return loss, grad

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _backward(ctx, grad_loss, _grad_grad):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0 and grad_loss.numel():
            raise RuntimeError(
                "vitfast.dense_soft_target_cross_entropy: the gradient was not computed in the forward "
                "(call the op with want_grad=True, or through vitfast.ops.dense_soft_target_cross_entropy)")
        return (grad_loss.unsqueeze(-1) * grad).to(grad.dtype), None, None, None, None

    torch.library.register_autograd("vitfast::dense_soft_target_ce", _backward, setup_context=_setup_context)


def dense_soft_target_ce_with_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                   student_scale: float = 1.0, teacher_scale: float = 1.0,
                                   want_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-row loss, d loss_row / d student_logits) without autograd: for callers that fold the
    gradient into their own backward (MiniViT's relation losses). The gradient is (0,) when not
    wanted."""
    if _ext.native(student_logits.device):
        return torch.ops.vitfast.dense_soft_target_ce(student_logits, teacher_logits, float(student_scale),
                                                      float(teacher_scale), want_grad)
    _ext.warn_fallback(OP, student_logits.device)
    check_dense_soft_ce_args(student_logits, teacher_logits, student_scale, teacher_scale)
    acc = _loss_dtype(student_logits, teacher_logits)
    with torch.enable_grad():
        s = student_logits.detach().to(acc).requires_grad_(want_grad)
        loss = dense_soft_target_cross_entropy_reference(s, teacher_logits, student_scale, teacher_scale, "none", acc)
        if not want_grad:
            return loss.detach(), student_logits.new_empty((0,))
        (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad.to(student_logits.dtype)


def dense_soft_target_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of softmax(student_scale * student) against softmax(teacher_scale * teacher),
    per row, in one fused pass: neither softmax is stored, and the gradient is computed with the
    loss (kept for the backward only when the student needs one). Knowledge distillation with
    temperature T is student_scale = teacher_scale = 1 / T (multiply by T^2 yourself if wanted).

    Args:
        student_logits: (..., C) float16/bfloat16/float32/float64, any leading dims (token-level
            distillation: (B, N, C)); differentiable.
        teacher_logits: the same shape, any float dtype; a constant (a teacher that requires grad
            raises).
        student_scale, teacher_scale: finite and > 0.
        reduction: "mean" | "sum" | "none" (the loss per row, shaped like the leading dims).

    Returns the loss in float32 (float64 when either side is float64). Teacher entries of
    probability 0 (-inf logits) add nothing, even where the student's are -inf too.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"vitfast.{OP}: argument 'reduction' must be one of {REDUCTIONS}, got {reduction!r}")
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        fail(ValueError, OP, "teacher_logits", "must not require grad (the teacher is a constant of this loss; "
             "pass teacher_logits.detach())")
    if student_logits.dim() == 0:
        fail(ValueError, OP, "student_logits", "must have a class dim (..., classes), got a 0-d tensor")
    lead = student_logits.shape[:-1]
    if student_logits.dim() != 2:  # leading dims flattened into rows (a view when contiguous)
        if teacher_logits.shape != student_logits.shape:
            fail(ValueError, OP, "teacher_logits", f"must have the shape of 'student_logits' "
                 f"{list(student_logits.shape)}, got {list(teacher_logits.shape)}")
        rows = math.prod(lead)  # not -1: a (..., 0) input must reach the class-count check
        student_logits = student_logits.reshape(rows, student_logits.shape[-1])
        teacher_logits = teacher_logits.reshape(rows, teacher_logits.shape[-1])
    want = torch.is_grad_enabled() and student_logits.requires_grad
    if _ext.native(student_logits.device):
        loss, _ = torch.ops.vitfast.dense_soft_target_ce(student_logits, teacher_logits, float(student_scale),
                                                         float(teacher_scale), want)
    else:
        _ext.warn_fallback(OP, student_logits.device)
        check_dense_soft_ce_args(student_logits, teacher_logits, student_scale, teacher_scale)
        acc = _loss_dtype(student_logits, teacher_logits)
        loss = dense_soft_target_cross_entropy_reference(student_logits, teacher_logits, student_scale,
                                                         teacher_scale, "none", acc)
    return reduce_loss(loss.reshape(lead) if len(lead) != 1 else loss, reduction)
