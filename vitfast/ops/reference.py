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
    if indices.device.type != "meta":  # meta: shapes only
        check_sparse_indices(indices, num_classes)
    x = student_logits.to(compute_dtype)
    target = sparse_soft_target_dense(values, indices, num_classes, compute_dtype)
    loss = -(target * torch.log_softmax(x, dim=-1)).sum(-1)
    return reduce_loss(loss, reduction)


def dense_soft_target_cross_entropy_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_scale: float = 1.0,
    teacher_scale: float = 1.0,
    reduction: str = "mean",
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """-sum_j softmax(teacher_scale t)_j log_softmax(student_scale s)_j per row, entries of teacher
    probability 0 adding nothing (differentiable in the student logits; the teacher is a constant)."""
    a = torch.log_softmax(student_logits.to(compute_dtype) * student_scale, dim=-1)
    q = torch.softmax(teacher_logits.detach().to(compute_dtype) * teacher_scale, dim=-1)
    # q == 0 (not q > 0): a teacher row without a softmax (NaN) must stay NaN
    loss = -torch.where(q == 0, torch.zeros((), dtype=compute_dtype, device=a.device), q * a).sum(-1)
    return reduce_loss(loss, reduction)


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def window_partition_reference(x: torch.Tensor, window_size, shift_size) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, wh * ww, C) after Swin's cyclic shift torch.roll(-shift)."""
    B, H, W, C = x.shape
    wh, ww = window_size
    if any(shift_size):
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    x = x.reshape(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse_reference(x: torch.Tensor, grid, window_size, shift_size) -> torch.Tensor:
    """Inverse of window_partition_reference: (B * windows, N, C) -> (B, H, W, C)."""
    H, W = grid
    wh, ww = window_size
    C = x.shape[-1]
    x = x.reshape(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)
    if any(shift_size):
        x = torch.roll(x, shifts=tuple(shift_size), dims=(1, 2))
    return x


def window_attention_reference(
    qkv: torch.Tensor,
    num_heads: int,
    dim_k: int,
    dim_v: int,
    offsets,
    head_stride: int,
    scale: float,
    bias_table: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    window_size=(),
    shift_size=(),
) -> torch.Tensor:
    """softmax(scale * q k^T + table[h, index] + mask[w % types]) v per window and head.

    qkv is (windows, N, C) or a feature map (B, H, W, C) cut into window_size windows after a
    cyclic shift by shift_size; head h's q/k/v sit at offsets[r] + h * head_stride. The output has
    qkv's leading shape and channels h * dim_v + c. Computed in qkv's dtype with torch ops: the
    head-mixing reference without mixes.
    """
    return head_mix_attention_reference(qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table,
                                        bias_index, mask, window_size=window_size, shift_size=shift_size)


def head_mix_attention_reference(
    qkv: torch.Tensor,
    num_heads: int,
    dim_k: int,
    dim_v: int,
    offsets,
    head_stride: int,
    scale: float,
    bias_table: torch.Tensor | None = None,
    bias_index: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    pre_mix: torch.Tensor | None = None,
    pre_mix_bias: torch.Tensor | None = None,
    post_mix: torch.Tensor | None = None,
    post_mix_bias: torch.Tensor | None = None,
    window_size=(),
    shift_size=(),
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Talking-heads (MiniViT / CaiT) attention: window_attention_reference with two H x H mixes
    across heads, written the way timm's TalkingHeadAttn and MiniViT's official code compute it.

    Per window, for heads g, h:
        S_h  = scale * q_h k_h^T + table[h, index]
        S'_g = sum_h pre_mix[g, h] S_h + pre_mix_bias[g] + mask[w % types]   (mask after the mix)
        P_g  = softmax(S'_g)
        P'_g = sum_h post_mix[g, h] P_h + post_mix_bias[g]
        out_g = P'_g v_g
    A missing mix is the identity, a missing bias zero. dropout_p > 0 drops entries of P' (timm
    CaiT's attn_drop; the fused op has none). Materialises (windows, H, N, N) tensors: a
    specification, not an implementation.
    """
    grid = qkv.dim() == 4
    x = window_partition_reference(qkv, window_size, shift_size) if grid else qkv
    windows, n, _ = x.shape
    heads = torch.arange(num_heads, device=qkv.device)

    def take(off, dim):
        cols = off + heads[:, None] * head_stride + torch.arange(dim, device=qkv.device)
        return x[..., cols.reshape(-1)].reshape(windows, n, num_heads, dim).transpose(1, 2)

    q, k, v = take(offsets[0], dim_k), take(offsets[1], dim_k), take(offsets[2], dim_v)
    s = (q @ k.transpose(-1, -2)) * scale
    if bias_table is not None:
        s = s + bias_table[:, bias_index].to(s.dtype)
    if pre_mix is not None:
        s = torch.einsum("gh,whij->wgij", pre_mix.to(s.dtype), s)
    if pre_mix_bias is not None:
        s = s + pre_mix_bias.to(s.dtype)[:, None, None]
    if mask is not None:
        s = s + mask.to(s.dtype).repeat(windows // mask.shape[0], 1, 1)[:, None]
    p = s.softmax(-1)
    if post_mix is not None:
        p = torch.einsum("gh,whij->wgij", post_mix.to(p.dtype), p)
    if post_mix_bias is not None:
        p = p + post_mix_bias.to(p.dtype)[:, None, None]
    if dropout_p:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = (p @ v).transpose(1, 2).reshape(windows, n, num_heads * dim_v)
    if grid:
        out = window_reverse_reference(out, qkv.shape[1:3], window_size, shift_size)
    return out
