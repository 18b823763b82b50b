"""Fused attention for timm's TinyViT: Attention (LeViT-style bias) and TinyVitBlock."""
from __future__ import annotations

import torch
from timm.models.tiny_vit import Attention, TinyVitBlock

from ..ops.window_attention import window_attention


def _attention_kwargs(attn: Attention) -> dict:
    return dict(
        num_heads=attn.num_heads,
        dim_k=attn.key_dim,
        dim_v=attn.val_dim,
        layout="tinyvit",
        scale=attn.scale,
        bias_table=attn.attention_biases,  # (heads, L)
        bias_index=attn.attention_bias_idxs,
    )


class FusedTinyVitAttention(Attention):
    """TinyViT attention on vitfast.ops.window_attention (K and V head dims may differ)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = window_attention(self.qkv(self.norm(x)), **_attention_kwargs(self))
        return self.proj(out)

    def forward_grid(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """x: the whole (B, H, W, C) map, cut into windows inside the kernel."""
        out = window_attention(self.qkv(self.norm(x)), window_size=(window_size, window_size),
                               **_attention_kwargs(self))
        return self.proj(out)


class FusedTinyVitBlock(TinyVitBlock):
    """TinyVitBlock without the window partition / reverse copies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        if (not getattr(self, "vitfast_grid", True) or H % ws or W % ws
                or not isinstance(self.attn, FusedTinyVitAttention)):
            return super().forward(x)
        x = x + self.drop_path1(self.attn.forward_grid(x, ws))
        x = x.permute(0, 3, 1, 2)
        x = self.local_conv(x)
        x = x.reshape(B, C, H * W).transpose(1, 2)
        x = x + self.drop_path2(self.mlp(x))
        return x.view(B, H, W, C)


def register() -> None:
    from . import register_patch

    register_patch(Attention, FusedTinyVitAttention)
    register_patch(TinyVitBlock, FusedTinyVitBlock)
