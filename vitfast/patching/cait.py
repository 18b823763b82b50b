"""Fused attention for timm's CaiT: TalkingHeadAttn (every cait_* model) on head_mix_attention."""
from __future__ import annotations

import torch
from timm.models.cait import TalkingHeadAttn

from ..ops.head_mix_attention import head_mix_attention


class FusedTalkingHeadAttn(TalkingHeadAttn):
    """timm TalkingHeadAttn with its two head mixes (proj_l before the softmax, proj_w after it)
    inside vitfast.ops.head_mix_attention: q, k, v straight from the qkv linear, no (B, H, N, N)
    tensor. Attention dropout in training takes timm's path. `vitfast_head_mix_impl` (set by
    vitfast.patch(model, head_mix_impl=...)) picks head_mix_attention's impl."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.attn_drop.p > 0:
            return super().forward(x)
        C = x.shape[-1]
        out = head_mix_attention(
            self.qkv(x), self.num_heads, C // self.num_heads, layout="swin", scale=self.scale,
            pre_mix=self.proj_l.weight, pre_mix_bias=self.proj_l.bias,
            post_mix=self.proj_w.weight, post_mix_bias=self.proj_w.bias,
            impl=getattr(self, "vitfast_head_mix_impl", "auto"))
        return self.proj_drop(self.proj(out))


def register() -> None:
    from . import register_patch

    register_patch(TalkingHeadAttn, FusedTalkingHeadAttn)
