"""MiniViT's building blocks (weight multiplexing): the weights a group of consecutive layers
shares (qkv, proj, fc1, fc2; Swin also its relative-position table), and per layer what makes the
shared layers differ -- their own LayerNorms, the head-mixing transforms of the attention (run by
the fused vitfast.head_mix_attention) and the MLP transform (LayerNorm + depth-wise convolution on
the token grid).

A Mini block refers to its group's SharedWeights without registering it (the model registers each
group once, in `model.minivit_shared`), so parameters(), state_dict(), DDP and optimizers see every
shared tensor exactly once; the reference survives .to(), deepcopy and torch.compile.

state_dict keys (stable): minivit_shared.<g>.{qkv,proj,fc1,fc2}.{weight,bias}
[, minivit_shared.<g>.relative_position_bias_table]; per layer, under the model's own block path
(blocks.<i>. for ViT, layers.<s>.blocks.<j>. for Swin): norm1, norm2, mix.{pre,pre_bias,post,
post_bias}, mlp_transform.{norm,conv}, ls1, ls2 (ViT LayerScale), attn_norm (ViT's scale_attn_norm)
and the timm model's other keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..ops import head_mix_attention, window_attention
from ..ops.reference import head_mix_attention_reference


class SharedWeights(nn.Module):
    """The weights of one sharing group: the qkv / proj linears of the attention, fc1 / fc2 of the
    MLP, and for Swin the (L, heads) relative-position bias table."""

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, fc1: nn.Linear, fc2: nn.Linear,
                 relative_position_bias_table: nn.Parameter | None = None):
        super().__init__()
        self.qkv, self.proj, self.fc1, self.fc2 = qkv, proj, fc1, fc2
        if relative_position_bias_table is not None:
            self.relative_position_bias_table = relative_position_bias_table


class HeadMix(nn.Module):
    """Per-layer H x H transforms across heads, before the softmax (pre) and after it (post), with
    biases (timm CaiT's proj_l / proj_w). Identity at initialisation; `reset_official` draws them
    like the official code (trunc_normal(0.02), zero biases)."""

    def __init__(self, heads: int):
        super().__init__()
        self.pre = nn.Parameter(torch.eye(heads))
        self.pre_bias = nn.Parameter(torch.zeros(heads))
        self.post = nn.Parameter(torch.eye(heads))
        self.post_bias = nn.Parameter(torch.zeros(heads))

    def reset_official(self) -> None:
        for p in (self.pre, self.post):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.zeros_(self.pre_bias)
        nn.init.zeros_(self.post_bias)

    def kwargs(self) -> dict:
        return dict(pre_mix=self.pre, pre_mix_bias=self.pre_bias, post_mix=self.post, post_mix_bias=self.post_bias)


class MlpTransform(nn.Module):
    """LayerNorm + depth-wise k x k convolution on the token grid, before the MLP.

    mode "residual" (default): x + conv(LN(x)); the convolution starts at zero, so the transform
    starts as the identity and a Mini model made from a pretrained one starts where it was.
    mode "official": x = LN(x); x = x + conv(x) -- the official Mini-Swin code, which normalises
    the residual stream itself (right when training from scratch, a jump away from a pretrained
    model). Prefix tokens (ViT's class token) pass through untouched."""

    def __init__(self, dim: int, kernel: int = 7, mode: str = "residual", eps: float = 1e-6):
        super().__init__()
        if mode not in ("residual", "official"):
            raise UserError(f"argument mlp_transform must be 'residual', 'official' or None, got {mode!r}")
        self.mode = mode
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim, bias=True)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def reset_official(self) -> None:
        nn.init.trunc_normal_(self.conv.weight, std=0.02)
        nn.init.zeros_(self.conv.bias)

    def _conv_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None, prefix: int = 0) -> torch.Tensor:
        if x.dim() == 4:  # (B, H, W, C): Swin
            if self.mode == "official":
                x = self.norm(x)
                return x + self._conv_nhwc(x)
            return x + self._conv_nhwc(self.norm(x))
        B, N, C = x.shape  # (B, prefix + H*W, C): ViT
        if N - prefix != grid[0] * grid[1]:
            raise ValueError(f"MiniViT MLP transform: {N} tokens are not {prefix} prefix token(s) and a "
                             f"{grid[0]}x{grid[1]} grid; a Mini ViT runs at the image size it was built for "
                             "unless the timm model was built with dynamic_img_size=True")
        head, tokens = x[:, :prefix], x[:, prefix:]
        g = tokens.reshape(B, grid[0], grid[1], C)
        if self.mode == "official":
            g = self.norm(g)
            g = g + self._conv_nhwc(g)
        else:
            g = g + self._conv_nhwc(self.norm(g))
        return torch.cat([head, g.reshape(B, N - prefix, C)], dim=1) if prefix else g.reshape(B, N, C)


def _same_forward(module: nn.Module, classes: tuple) -> bool:
    # a subclass that keeps the forward computes what the Mini block re-implements
    return any(isinstance(module, c) and type(module).forward is c.forward for c in classes)


def check_block(block: nn.Module, index: int, arch: str) -> None:
    """A UserError naming what the Mini blocks cannot re-implement on shared weights: a Mini block
    replays its timm block's forward around the shared linears, so anything else would be silently
    another function (a post-norm or parallel block, differential attention, a q/k norm, a gate)."""
    from timm.layers import GluMlp, Mlp

    if arch == "vit":
        from timm.models.vision_transformer import Attention, Block

        kinds = "timm's pre-norm Block with Attention and an Mlp or GluMlp (ViT, DeiT, DeiT III, DINOv2)"
        block_cls, attn_cls = (Block,), (Attention,)
    else:
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention

        from ..patching.swin import FusedSwinTransformerBlock, FusedWindowAttention

        kinds = "timm's SwinTransformerBlock with WindowAttention and an Mlp (Swin v1)"
        # vitfast.patch's fused modules compute the same (peer-checked in tests/test_patch.py)
        block_cls = (SwinTransformerBlock, FusedSwinTransformerBlock)
        attn_cls = (WindowAttention, FusedWindowAttention)
    where = f"MiniViT: block {index}"
    if not _same_forward(block, block_cls):
        raise UserError(f"{where} is a {type(block).__name__}; multiplex takes {kinds}")
    attn, mlp = block.attn, block.mlp
    if not _same_forward(attn, attn_cls):
        raise UserError(f"{where} has a {type(attn).__name__}; multiplex takes {kinds}")
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity):
        raise UserError(f"{where}: attention with q/k normalisation (qk_norm) is not supported")
    if getattr(attn, "gate", None) is not None:
        raise UserError(f"{where}: gated attention (attn.gate) is not supported")
    mlp_types = (Mlp, GluMlp) if arch == "vit" else (Mlp,)
    if not _same_forward(mlp, mlp_types) or not isinstance(mlp.fc1, nn.Linear):
        raise UserError(f"{where} has a {type(mlp).__name__} MLP; multiplex takes {kinds}")


class _MiniBlock(nn.Module):
    """What Mini ViT and Swin blocks share: the group reference, capture for distillation."""

    shared: SharedWeights
    glu: tuple[int, bool] | None = None  # GluMlp's (chunk_dim, gate_last): fc1 makes value and gate

    def set_shared(self, shared: SharedWeights) -> None:
        object.__setattr__(self, "shared", shared)  # a reference, not a submodule

    def __deepcopy__(self, memo):
        # nn.Module's deepcopy copies __dict__ (the reference included, through memo) -- spelled out
        # so that a copied block can never end up pointing at the original's group
        import copy

        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    def attention(self, qkv: torch.Tensor, **kw) -> torch.Tensor:
        if self.capture:
            self.captured_qkv = qkv
        if self.eager or (self.attn_drop and self.training):  # PyTorch ops (the fused kernels have no dropout)
            offsets = [0, self.num_heads * self.head_dim, 2 * self.num_heads * self.head_dim]
            return head_mix_attention_reference(
                qkv, self.num_heads, self.head_dim, self.head_dim, offsets, self.head_dim, self.scale,
                kw.get("bias_table"), kw.get("bias_index"), kw.get("mask"),
                window_size=kw.get("window_size") or (), shift_size=kw.get("shift_size") or (),
                dropout_p=self.attn_drop, **(self.mix.kwargs() if self.mix is not None else {}))
        if self.mix is None:
            return window_attention(qkv, self.num_heads, self.head_dim, scale=self.scale, **kw)
        return head_mix_attention(qkv, self.num_heads, self.head_dim, scale=self.scale, impl=self.head_mix_impl, **kw,
                                  **self.mix.kwargs())

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        h = s.fc1(x)
        if self.glu is None:
            h = self.act(h)
        else:  # timm's GluMlp (DINOv2 giant's SwiGLU)
            a, b = h.chunk(2, dim=self.glu[0])
            h = a * self.act(b) if self.glu[1] else self.act(a) * b
        return self.mlp_drop2(s.fc2(self.mlp_norm(self.mlp_drop1(h))))


class MiniViTBlock(_MiniBlock):
    """A timm VisionTransformer Block (DeiT) on its group's shared weights."""

    def __init__(self, block: nn.Module, heads_mix: bool, mlp_transform: str | None, grid, prefix: int):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.ls1, self.ls2 = block.ls1, block.ls2
        norm = getattr(attn, "norm", None)  # timm's scale_attn_norm (on the heads' output), per layer
        self.attn_norm = norm if norm is not None else nn.Identity()
        if hasattr(mlp, "gate_last"):
            self.glu = (int(mlp.chunk_dim), bool(mlp.gate_last))
        self.drop_path1, self.drop_path2 = block.drop_path1, block.drop_path2
        self.proj_drop = attn.proj_drop
        self.attn_drop = float(attn.attn_drop.p)
        self.act, self.mlp_drop1, self.mlp_norm, self.mlp_drop2 = mlp.act, mlp.drop1, mlp.norm, mlp.drop2
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = float(attn.scale)
        self.grid, self.prefix = tuple(grid), prefix
        self.mix = HeadMix(self.num_heads) if heads_mix else None
        self.mlp_transform = MlpTransform(self.norm1.normalized_shape[0], mode=mlp_transform,
                                          eps=self.norm1.eps) if mlp_transform else None
        self.capture = False
        self.eager = False  # True: the attention in PyTorch ops (benchmark baseline, attention dropout)
        self.head_mix_impl = "auto"  # or "fused" / "sdpa": head_mix_attention's impl (faster is per GPU and shape)

    def token_grid(self) -> tuple[int, int]:
        source = getattr(self, "grid_source", None)  # dynamic_img_size: the grid of this forward's image
        return getattr(source, "minivit_grid", self.grid) if source is not None else self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        out = self.attn_norm(self.attention(s.qkv(self.norm1(x))))
        x = x + self.drop_path1(self.ls1(self.proj_drop(s.proj(out))))
        if self.mlp_transform is not None:
            x = self.mlp_transform(x, self.token_grid(), self.prefix)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MiniSwinBlock(_MiniBlock):
    """A timm SwinTransformerBlock (v1) on its group's shared weights; keeps its own window shift
    (the W/SW alternation is per layer) and shift mask, which the fused op adds after the
    pre-softmax mix."""

    def __init__(self, block: nn.Module, heads_mix: bool, mlp_transform: str | None):
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.drop_path1, self.drop_path2 = block.drop_path1, block.drop_path2
        self.proj_drop = attn.proj_drop
        self.attn_drop = float(attn.attn_drop.p)
        self.act, self.mlp_drop1, self.mlp_norm, self.mlp_drop2 = mlp.act, mlp.drop1, mlp.norm, mlp.drop2
        self.num_heads = attn.num_heads
        self.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        self.scale = float(attn.scale)
        self.window_size, self.shift_size = tuple(block.window_size), tuple(block.shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.input_resolution = tuple(block.input_resolution)
        self.dynamic_mask = bool(getattr(block, "dynamic_mask", False))
        self.register_buffer("attn_mask", block.attn_mask, persistent=False)
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.mix = HeadMix(self.num_heads) if heads_mix else None
        self.mlp_transform = MlpTransform(self.norm1.normalized_shape[0], mode=mlp_transform,
                                          eps=self.norm1.eps) if mlp_transform else None
        self.capture = False
        self.eager = False
        self.head_mix_impl = "auto"

    def _mask_for(self, Hp: int, Wp: int, like: torch.Tensor):
        if not any(self.shift_size):
            return None
        if self.dynamic_mask or self.attn_mask is None:
            from timm.models.swin_transformer import SwinTransformerBlock

            return SwinTransformerBlock.get_attn_mask(self, like.new_zeros(1, Hp, Wp, 1))
        return self.attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        B, H, W, C = x.shape
        y = self.norm1(x)
        kw = dict(bias_table=s.relative_position_bias_table.t(), bias_index=self.relative_position_index)
        wh, ww = self.window_size
        if H % wh == 0 and W % ww == 0:  # the whole map to the kernel: shift and partition are index arithmetic
            out = self.attention(s.qkv(y), window_size=self.window_size, shift_size=self.shift_size,
                                 mask=self._mask_for(H, W, y), **kw)
        else:  # timm's order: roll, pad (zeros after the norm), partition, attention, and back
            from ..ops.reference import window_partition_reference, window_reverse_reference

            shifted = torch.roll(y, (-self.shift_size[0], -self.shift_size[1]), (1, 2)) if any(self.shift_size) else y
            ph, pw = (wh - H % wh) % wh, (ww - W % ww) % ww
            padded = F.pad(shifted, (0, 0, 0, pw, 0, ph))
            windows = window_partition_reference(s.qkv(padded), self.window_size, (0, 0))
            att = self.attention(windows, mask=self._mask_for(H + ph, W + pw, y), **kw)
            out = window_reverse_reference(att, (H + ph, W + pw), self.window_size, (0, 0))[:, :H, :W]
            if any(self.shift_size):
                out = torch.roll(out, self.shift_size, (1, 2))
        x = x + self.drop_path1(self.proj_drop(s.proj(out)))
        if self.mlp_transform is not None:
            x = self.mlp_transform(x)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def record_token_grid(patch_embed: nn.Module, args) -> None:
    """Forward pre-hook on the patch embedding of a timm ViT built with dynamic_img_size: the token
    grid of the image being run, read by the Mini blocks' MLP transforms (a module-level function,
    so that deepcopy and pickling keep it)."""
    patch_embed.minivit_grid = tuple(int(v) for v in patch_embed.dynamic_feat_size(args[0].shape[-2:]))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def grid_of(model: nn.Module) -> tuple[int, int]:
    g = model.patch_embed.grid_size
    return (int(g[0]), int(g[1]))


def trunc_normal_linear(m: nn.Linear) -> None:
    nn.init.trunc_normal_(m.weight, std=0.02)
    if m.bias is not None:
        nn.init.zeros_(m.bias)

