"""Argument checks for the Python side (fake kernels and the fallback path), worded like the
C++ checks so an error reads the same on every path."""
from __future__ import annotations

import math

import torch

TOPK_MAX_K = 2048
SOFT_TARGET_MAX_K = 2048

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int16, torch.int32, torch.int64)


def fail(exc: type, op: str, arg: str, what: str):
    raise exc(f"vitfast.{op}: argument '{arg}' {what}")


def check_dtype(t: torch.Tensor, allowed, op: str, arg: str) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(a).replace("torch.", "") for a in allowed)
        fail(TypeError, op, arg, f"must have dtype in {{{names}}}, got {str(t.dtype).replace('torch.', '')}")


def check_topk_args(logits, k, temperature, values_dtype) -> None:
    op = "topk_softmax"
    if logits.dim() != 2:
        fail(ValueError, op, "logits", f"must be 2-D (rows, classes), got shape {list(logits.shape)}")
    check_dtype(logits, FLOATS[:3], op, "logits")
    c = logits.shape[1]
    if not 1 <= c <= 2**31 - 1:
        fail(ValueError, op, "logits", f"must have between 1 and 2^31-1 classes, got {c}")
    if not (1 <= k <= c and k <= TOPK_MAX_K):
        fail(ValueError, op, "k", f"must be in [1, min(classes, {TOPK_MAX_K})] = [1, {min(c, TOPK_MAX_K)}], got {k}")
    if not (math.isfinite(temperature) and temperature > 0):
        fail(ValueError, op, "temperature", f"must be finite and > 0, got {temperature}")
    if not math.isfinite(float(torch.tensor(1.0 / temperature, dtype=torch.float32))):
        fail(ValueError, op, "temperature", f"must be at least ~3e-39 (1 / temperature must fit a float32), "
             f"got {temperature}")
    if values_dtype not in (None, torch.float16, torch.float32):
        fail(TypeError, op, "values_dtype", f"must be torch.float16 or torch.float32, got {values_dtype}")


def check_soft_target_args(logits, values, indices, num_classes) -> None:
    op = "sparse_soft_target_cross_entropy"
    if logits.dim() != 2:
        fail(ValueError, op, "student_logits", f"must be 2-D (batch, classes), got shape {list(logits.shape)}")
    check_dtype(logits, FLOATS, op, "student_logits")
    check_dtype(values, FLOATS, op, "values")
    check_dtype(indices, INTS, op, "indices")
    for arg, t in (("values", values), ("indices", indices)):
        if t.device != logits.device:
            fail(ValueError, op, arg, f"must be on the same device as 'student_logits' ({logits.device}), got {t.device}")
    b, c = logits.shape
    if values.dim() != 2 or values.shape[0] != b:
        fail(ValueError, op, "values", f"must have shape ({b}, k) to match student_logits, got {list(values.shape)}")
    if indices.shape != values.shape:
        fail(ValueError, op, "indices", f"must have the shape of 'values' {list(values.shape)}, got {list(indices.shape)}")
    k = values.shape[1]
    if not (1 <= k <= c and k <= SOFT_TARGET_MAX_K):
        fail(ValueError, op, "values",
             f"must hold k in [1, min(classes, {SOFT_TARGET_MAX_K})] = [1, {min(c, SOFT_TARGET_MAX_K)}] entries per row, "
             f"got {k}")
    if num_classes != c:
        fail(ValueError, op, "num_classes", f"must equal student_logits.shape[1] = {c}, got {num_classes}")
