"""MiniViT's relation losses without autograd's saved (windows, heads, N, N) tensors.

Autograd keeps, for each of the 9 q/k/v relation pairs of each distilled layer pair, the student's
relation matrix, its log-softmax and the teacher's softmax until the backward: ~3 x 9 x pairs
(B, heads, N, N) float32 tensors (Mini-DeiT-S at bs 128, 6 layer pairs: ~3 GB). A relation loss is
a scalar, so its gradient is known (up to the incoming factor) while each relation is at hand:
these functions compute loss and gradient together, a chunk of windows at a time, and keep only
the (B, N, C) gradient -- at most one chunk's (chunk, heads, N, N) relation exists at once, and no
relation is read back in the backward. The math and the results are those of
`distill.attention_relation_loss` / `hidden_relation_loss` (tests compare them in float64,
gradcheck).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..errors import UserError

# windows per chunk: at most this many relation entries (float32: 64 MB) alive at once
CHUNK_ENTRIES = 1 << 24


def _chunks(windows: int, heads: int, n: int):
    step = max(1, CHUNK_ENTRIES // max(1, heads * n * n))
    return [(a, min(windows, a + step)) for a in range(0, windows, step)]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(W, N, C) -> (W, heads, N, C / heads)."""
    w, n, c = x.shape
    return x.reshape(w, n, heads, c // heads).transpose(1, 2)


class _AttentionRelationCE(torch.autograd.Function):
    """mean over the 9 (i, j) pairs of q, k, v and over rows of
    -sum_k softmax(T_i T_j^T / sqrt(d_T))[k] log_softmax(S_i S_j^T / sqrt(d_S))[k].

    The loss is a scalar, so its gradient is known up to the incoming factor while each relation
    is at hand: the forward computes it, chunk by chunk, and keeps only that (W, N, 3C) tensor."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, heads: int, want_grad: bool) -> torch.Tensor:
        s = [_split_heads(x, heads) for x in student.chunk(3, -1)]
        t = [_split_heads(x, heads) for x in teacher.chunk(3, -1)]
        w, h, n, d = s[0].shape
        scale, t_scale = d ** -0.5, t[0].shape[-1] ** -0.5  # each side by its own head width
        rows = 9 * w * h * n
        total = student.new_zeros(())
        gs = [torch.zeros_like(x) for x in s] if want_grad else None
        for a, b in _chunks(w, h, n):
            for i in range(3):
                for j in range(3):
                    pt = F.softmax(t[i][a:b] @ t[j][a:b].transpose(-1, -2) * t_scale, -1)
                    ls = F.log_softmax(s[i][a:b] @ s[j][a:b].transpose(-1, -2) * scale, -1)
                    total = total - (pt * ls).sum()
                    if want_grad:
                        # d/dr of -sum_k pt_k log_softmax(r)_k = softmax(r) sum_k pt_k - pt
                        g = (ls.exp_() * pt.sum(-1, keepdim=True) - pt) * (scale / rows)
                        gs[i][a:b] += g @ s[j][a:b]
                        gs[j][a:b] += g.transpose(-1, -2) @ s[i][a:b]
        if want_grad:
            ctx.save_for_backward(torch.cat([x.transpose(1, 2).reshape(w, n, -1) for x in gs], -1))
        return total / rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (gs,) = ctx.saved_tensors
        return gs * grad, None, None, None


class _HiddenRelationMSE(torch.autograd.Function):
    """mean((S S^T - T T^T)^2) x N over (W, N, N), for row-normalised S and T; the gradient
    4 (S S^T - T T^T) S / (W N) computed in the forward, like the attention relations."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, want_grad: bool) -> torch.Tensor:
        w, n, _ = s.shape
        total = s.new_zeros(())
        gs = torch.empty_like(s) if want_grad else None
        for a, b in _chunks(w, 1, n):
            diff = s[a:b] @ s[a:b].transpose(-1, -2) - t[a:b] @ t[a:b].transpose(-1, -2)
            total = total + diff.square().sum()
            if want_grad:
                gs[a:b] = (diff @ s[a:b]) * (4 / (w * n))  # diff is symmetric: 2 (D + D^T) S / (W N)
        if want_grad:
            ctx.save_for_backward(gs)
        return total / (w * n)  # mean over W N N entries, times N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (gs,) = ctx.saved_tensors
        return gs * grad, None, None


def attention_relation_loss_lean(student_qkv: torch.Tensor, teacher_qkv: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """distill.attention_relation_loss, recomputing the relations in the backward (float32 or wider)."""
    if student_qkv.shape[:2] != teacher_qkv.shape[:2]:
        raise UserError(f"attention relations need the same windows and tokens on both sides: student "
                        f"{tuple(student_qkv.shape[:2])}, teacher {tuple(teacher_qkv.shape[:2])}")
    for side, x in (("student", student_qkv), ("teacher", teacher_qkv)):
        if x.shape[-1] % (3 * heads):
            raise UserError(f"relation heads ({heads}) must divide the {side}'s qkv width ({x.shape[-1] // 3})")
    dtype = torch.promote_types(student_qkv.dtype, torch.float32)
    with torch.autocast(student_qkv.device.type, enabled=False):
        want = torch.is_grad_enabled() and student_qkv.requires_grad
        return _AttentionRelationCE.apply(student_qkv.to(dtype), teacher_qkv.detach().to(dtype), heads, want)


def hidden_relation_loss_lean(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """distill.hidden_relation_loss, recomputing the relations in the backward (float32 or wider)."""
    if student.shape[:2] != teacher.shape[:2]:
        raise UserError(f"hidden relations need the same windows and tokens on both sides: student "
                        f"{tuple(student.shape[:2])}, teacher {tuple(teacher.shape[:2])}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.to(dtype), dim=-1)
        t = F.normalize(teacher.detach().to(dtype), dim=-1)
        return _HiddenRelationMSE.apply(s, t, torch.is_grad_enabled() and s.requires_grad)
