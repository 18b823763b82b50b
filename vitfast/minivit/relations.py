"""MiniViT's relation losses without autograd's saved (windows, heads, N, N) tensors.

Autograd keeps, for each of the 9 q/k/v relation pairs of each distilled layer pair, the student's
relation matrix, its log-softmax and the teacher's softmax until the backward: ~3 x 9 x pairs
(B, heads, N, N) float32 tensors (Mini-DeiT-S at bs 128, 6 layer pairs: ~3 GB). A relation loss is
a scalar, so its gradient is known (up to the incoming factor) while each relation is at hand:
these functions compute loss and gradient together, a chunk of windows at a time, and keep only
the (B, N, C) gradient -- at most one chunk's relations exist at once ((chunk, heads, 3N, 3N) for
the 9 attention relations side by side), and no relation is read back in the backward. The math and the results are those of
`distill.attention_relation_loss` / `hidden_relation_loss` (tests compare them in float64,
gradcheck).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..errors import UserError
from ..ops.dense_soft_target_ce import dense_soft_target_ce_with_grad

# windows per chunk: at most this many relation entries (float32: 64 MB per tensor) alive at once
CHUNK_ENTRIES = 1 << 24


def _chunks(windows: int, heads: int, n: int):
    step = max(1, CHUNK_ENTRIES // max(1, heads * n * n))
    return [(a, min(windows, a + step)) for a in range(0, windows, step)]


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(W, N, C) -> (W, heads, N, C / heads)."""
    w, n, c = x.shape
    return x.reshape(w, n, heads, c // heads).transpose(1, 2)


def _tokens_stacked(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(W, N, 3C) qkv -> (W, heads, 3N, C / heads): q, k and v tokens stacked, so one product
    X X^T holds all 9 relations (block (i, j) = X_i X_j^T)."""
    return torch.cat([_split_heads(x, heads) for x in x.chunk(3, -1)], dim=2)


class _AttentionRelationCE(torch.autograd.Function):
    """mean over the 9 (i, j) pairs of q, k, v and over rows of
    -sum_k softmax(T_i T_j^T / sqrt(d_T))[k] log_softmax(S_i S_j^T / sqrt(d_S))[k].

    The 9 relations of a chunk are one product per side (q, k, v tokens stacked: (3N, 3N) blocks),
    in `mm_dtype` (the autocast dtype in a mixed-precision step, like every other product of it),
    softmaxes and cross-entropy in float32 or wider. The loss is a scalar, so its gradient is known
    up to the incoming factor while the relations are at hand: the forward computes it too, as one
    more product per chunk (the 18 of autograd's backward become one), and keeps only that
    (W, N, 3C) tensor."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, heads: int, want_grad: bool,
                mm_dtype: torch.dtype, fused: bool) -> torch.Tensor:
        acc = torch.promote_types(student.dtype, torch.float32)
        s = _tokens_stacked(student, heads).to(mm_dtype)  # (W, h, 3N, d)
        t = _tokens_stacked(teacher, heads).to(mm_dtype)
        w, h, n3, d = s.shape
        n = n3 // 3
        scale, t_scale = d ** -0.5, t.shape[-1] ** -0.5  # each side by its own head width
        rows = 9 * w * h * n
        total = torch.zeros((), dtype=acc, device=student.device)
        gs = torch.empty(s.shape, dtype=acc, device=s.device) if want_grad else None
        for a, b in _chunks(w, 9 * h, n):
            sc, tc = s[a:b], t[a:b]
            if fused:
                # (c, h, 3N, 3N) products; each row of N entries is one relation row of one pair:
                # both softmaxes, the cross-entropy and its gradient in one pass of the fused op
                rs, rt = sc @ sc.transpose(-1, -2), tc @ tc.transpose(-1, -2)
                loss, g = dense_soft_target_ce_with_grad(rs.view(-1, n), rt.view(-1, n), scale, t_scale, want_grad)
                total = total + loss.sum().to(acc)
                if want_grad:
                    g = g.view(rs.shape)  # scale (softmax(rs) - softmax(rt)) per relation row
                    gs[a:b] = ((g + g.transpose(-1, -2)) @ sc).to(acc).mul_(1.0 / rows)
                continue
            # (c, h, 3N, 3, N): row (i, r) of block j is relation row r of pair (i, j)
            pt = F.softmax((tc @ tc.transpose(-1, -2)).to(acc).mul_(t_scale).unflatten(-1, (3, n)), -1)
            ls = F.log_softmax((sc @ sc.transpose(-1, -2)).to(acc).mul_(scale).unflatten(-1, (3, n)), -1)
            total = total - (pt * ls).sum()
            if want_grad:
                # d/dr of -sum_k pt_k log_softmax(r)_k = softmax(r) sum_k pt_k - pt; the relations
                # are scale S S^T, so dS = scale (g + g^T) S
                g = (ls.exp_().mul_(pt.sum(-1, keepdim=True)).sub_(pt)).flatten(-2).mul_(scale / rows)
                gs[a:b] = ((g + g.transpose(-1, -2)).to(mm_dtype) @ sc).to(acc)
        if want_grad:
            gq, gk, gv = gs.split(n, dim=2)
            ctx.save_for_backward(torch.cat([x.transpose(1, 2).reshape(w, n, -1) for x in (gq, gk, gv)], -1))
        return total / rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (gs,) = ctx.saved_tensors
        return gs * grad, None, None, None, None, None


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


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the relation products: the autocast dtype inside a mixed-precision region (as
    MiniViT's official AMP training computes them), else float32 or wider."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, torch.float32)


def attention_relation_loss_lean(student_qkv: torch.Tensor, teacher_qkv: torch.Tensor, heads: int = 1,
                                 fused: bool = True) -> torch.Tensor:
    """distill.attention_relation_loss as one product per side and chunk, its gradient computed
    with it; products in the autocast dtype under autocast, softmaxes and the loss in float32.
    fused: the softmaxes, the cross-entropy and its gradient per relation row in one pass
    (vitfast.ops.dense_soft_target_cross_entropy's kernel) instead of ~15 eager float32 passes."""
    if student_qkv.shape[:2] != teacher_qkv.shape[:2]:
        raise UserError(f"attention relations need the same windows and tokens on both sides: student "
                        f"{tuple(student_qkv.shape[:2])}, teacher {tuple(teacher_qkv.shape[:2])}")
    for side, x in (("student", student_qkv), ("teacher", teacher_qkv)):
        if x.shape[-1] % (3 * heads):
            raise UserError(f"relation heads ({heads}) must divide the {side}'s qkv width ({x.shape[-1] // 3})")
    mm_dtype = _mm_dtype(student_qkv)
    acc = torch.promote_types(student_qkv.dtype, torch.float32)
    with torch.autocast(student_qkv.device.type, enabled=False):
        want = torch.is_grad_enabled() and student_qkv.requires_grad
        return _AttentionRelationCE.apply(student_qkv.to(acc), teacher_qkv.detach(), heads, want, mm_dtype, fused)


def hidden_relation_loss_lean(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """distill.hidden_relation_loss with its gradient computed in the forward, a chunk at a time
    (float32 or wider: the difference of two Gram matrices would lose too much in bf16)."""
    if student.shape[:2] != teacher.shape[:2]:
        raise UserError(f"hidden relations need the same windows and tokens on both sides: student "
                        f"{tuple(student.shape[:2])}, teacher {tuple(teacher.shape[:2])}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.to(dtype), dim=-1)
        t = F.normalize(teacher.detach().to(dtype), dim=-1)
        return _HiddenRelationMSE.apply(s, t, torch.is_grad_enabled() and s.requires_grad)
