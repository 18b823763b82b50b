"""Fused attention for timm's Swin Transformer (v1): WindowAttention and SwinTransformerBlock."""
from __future__ import annotations

from typing import Optional

import torch
from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

from ..ops.window_attention import window_attention


def _attention_kwargs(attn: WindowAttention) -> dict:
    heads = attn.num_heads
    return dict(
        num_heads=heads,
        dim_k=attn.qkv.out_features // (3 * heads),
        layout="swin",
        scale=attn.scale,
        bias_table=attn.relative_position_bias_table.t(),  # (L, heads) -> (heads, L), a view
        bias_index=attn.relative_position_index,
    )


def _needs_eager(attn: WindowAttention) -> bool:
    return attn.training and attn.attn_drop.p > 0  # attention dropout: not fused


class FusedWindowAttention(WindowAttention):
    """timm WindowAttention on vitfast.ops.window_attention: q, k, v straight from the qkv linear,
    the bias table gathered inside the kernel, the shift mask applied there."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if _needs_eager(self):
            return super().forward(x, mask)
        out = window_attention(self.qkv(x), mask=mask, **_attention_kwargs(self))
        return self.proj_drop(self.proj(out))

    def forward_grid(self, x: torch.Tensor, window_size, shift_size, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x: the whole (B, H, W, C) map; partition, shift and their inverses happen in the kernel."""
        out = window_attention(self.qkv(x), mask=mask, window_size=window_size, shift_size=shift_size,
                               **_attention_kwargs(self))
        return self.proj_drop(self.proj(out))


class FusedSwinTransformerBlock(SwinTransformerBlock):
    """Hands the un-partitioned map to the fused attention (no roll, pad, partition copies)."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        wh, ww = self.window_size
        if (not getattr(self, "vitfast_grid", True) or H % wh or W % ww
                or not isinstance(self.attn, FusedWindowAttention) or _needs_eager(self.attn)):
            return super()._attn(x)
        mask = self.get_attn_mask(x) if getattr(self, "dynamic_mask", False) else self.attn_mask
        return self.attn.forward_grid(x, self.window_size, self.shift_size, mask)


def register() -> None:
    from . import register_patch

    register_patch(WindowAttention, FusedWindowAttention)
    register_patch(SwinTransformerBlock, FusedSwinTransformerBlock)
