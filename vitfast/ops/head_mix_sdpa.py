"""head_mix_attention on F.scaled_dot_product_attention: the talking-heads computation rewritten so
that both mixes land inside plain attention calls, without a (windows, H, N, N) tensor whenever
SDPA picks a fused backend (memory-efficient attention has no head-dim limit).

Why it is exact: the pre-softmax mix is linear in the scores, so for each output head g

    S'_g = sum_h pre[g, h] scale q_h k_h^T = Q'_g K'^T,   Q'_g = [pre[g,1] scale q_1 | ... | pre[g,H] scale q_H],
                                                           K'   = [k_1 | ... | k_H]          (inner size H * dim_k)

and the table bias mixes the same way into a small (H, N, N) bias. After the softmax,
out_g = sum_h post[g, h] P_h v_g, i.e. head h's attention over V' = [v_1 | ... | v_H] (value size
H * dim_v), then a mix of the per-head blocks. The cost is ~H times SDPA's FLOPs on tensor cores,
against the fused kernel's extra CUDA-core work per score; which is faster is measured per shape
(`benchmarks/head_mix_cases.py`, impl "vitfast sdpa").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import window_partition_reference, window_reverse_reference


def _heads(x: torch.Tensor, offset: int, head_stride: int, num_heads: int, dim: int) -> torch.Tensor:
    """(windows, N, C) -> (windows, heads, N, dim): head h's channels start at offset + h * head_stride."""
    windows, n, _ = x.shape
    if head_stride == dim:  # heads packed side by side (timm's Swin / ViT layout): a view
        return x.narrow(-1, offset, num_heads * dim).unflatten(-1, (num_heads, dim)).transpose(1, 2)
    cols = offset + torch.arange(num_heads, device=x.device)[:, None] * head_stride + torch.arange(dim, device=x.device)
    return x[..., cols.reshape(-1)].reshape(windows, n, num_heads, dim).transpose(1, 2)


def _score_bias(bias_table, bias_index, mask, pre_mix, dtype: torch.dtype):
    """The additive bias of the mixed scores: (1, H, N, N) for the table alone, (T, H or 1, N, N)
    with a mask of T window types (window w takes type w % T)."""
    bias = None
    if bias_table is not None:
        table = bias_table[:, bias_index].to(dtype)  # (H, N, N), mixed like the scores it is added to
        if pre_mix is not None:
            table = torch.einsum("gh,hij->gij", pre_mix.to(dtype), table)
        bias = table[None]
    if mask is not None:
        m = mask.to(dtype)[:, None]
        bias = m if bias is None else bias + m
    return bias


def head_mix_attention_sdpa(qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table=None,
                            bias_index=None, mask=None, pre_mix=None, pre_mix_bias=None, post_mix=None,
                            post_mix_bias=None, window_size=(), shift_size=()):
    """head_mix_attention_reference's computation (same arguments, same result up to rounding) on
    scaled_dot_product_attention, computed in qkv's dtype; differentiable in every tensor."""
    grid = qkv.dim() == 4
    x = window_partition_reference(qkv, window_size, shift_size) if grid else qkv
    windows, n, _ = x.shape
    H = num_heads
    q = _heads(x, offsets[0], head_stride, H, dim_k)
    k = _heads(x, offsets[1], head_stride, H, dim_k)
    v = _heads(x, offsets[2], head_stride, H, dim_v)
    dtype = q.dtype
    if pre_mix is not None:
        # scale folded into the (float32 or wider) mix before the cast: one rounding of q
        mix = (pre_mix.to(torch.promote_types(pre_mix.dtype, torch.float32)) * scale).to(dtype)
        qm = torch.einsum("gh,whnd->wgnhd", mix, q).reshape(windows, H, n, H * dim_k)
        km = k.transpose(1, 2).reshape(windows, 1, n, H * dim_k).expand(windows, H, n, H * dim_k)
        sdpa_scale = 1.0
    else:
        qm, km, sdpa_scale = q, k, scale
    vm = v.transpose(1, 2).reshape(windows, 1, n, H * dim_v).expand(windows, H, n, H * dim_v) \
        if post_mix is not None else v
    bias = _score_bias(bias_table, bias_index, mask, pre_mix, dtype)
    types = 1 if mask is None else mask.shape[0]  # divides the windows (checked by the op)
    if types > 1:
        # windows = groups x types, window w of type w % types: fold the types into the head axis so
        # the (types, H, N, N) bias broadcasts over the groups instead of being copied per window
        groups = windows // types
        bias = bias.expand(types, H, n, n).reshape(1, types * H, n, n)
        o = F.scaled_dot_product_attention(qm.reshape(groups, types * H, n, -1), km.reshape(groups, types * H, n, -1),
                                           vm.reshape(groups, types * H, n, -1), attn_mask=bias, scale=sdpa_scale)
        o = o.reshape(windows, H, n, -1)
    else:
        o = F.scaled_dot_product_attention(qm, km, vm, attn_mask=bias, scale=sdpa_scale)
    if post_mix is not None:  # o[w, h] = P_h [v_1 | ... | v_H]; out_g = sum_h post[g, h] P_h v_g
        o = torch.einsum("gh,whngd->wgnd", post_mix.to(dtype), o.unflatten(-1, (H, dim_v)))
    if post_mix_bias is not None:  # a constant added to every probability: + b_g * sum_j v_g[j]
        # in float32 (or wider) before one cast: a 16-bit sum_j v_j and product would round the
        # term, and b's gradient sum_(w,i) dO_i . sum_j v_j (much cancellation) would sum rounded terms
        wide = torch.promote_types(post_mix_bias.dtype, torch.float32)
        term = post_mix_bias.to(wide)[None, :, None, None] * v.sum(2, keepdim=True, dtype=wide)
        o = o + term.to(dtype)
    out = o.transpose(1, 2).reshape(windows, n, H * dim_v)
    if pre_mix_bias is not None and pre_mix_bias.requires_grad:
        out = out + 0 * pre_mix_bias.sum()  # cancels in the softmax: in the graph, gradient exactly zero
    if grid:
        out = window_reverse_reference(out, qkv.shape[1:3], window_size, shift_size)
    return out
