"""Drop the fused attention ops into models you already have.

    model = timm.create_model("swin_tiny_patch4_window7_224")
    vitfast.patch(model)      # in place; returns the model
    vitfast.unpatch(model)    # back to the original modules

Covered: timm's Swin (v1) and TinyViT attention (window_attention) and CaiT's talking-heads
attention (head_mix_attention). Patching swaps the class of each matching module for a fused
subclass (registry below): no
parameter, buffer or state_dict key changes, so checkpoints load before or after patching. With
grid=True (default) the blocks also hand the whole (B, H, W, C) feature map to the kernel, which
does window partition, reverse and Swin's cyclic shift by index arithmetic; maps that would need
padding take the blocks' original path (their attention is still fused).
"""
from __future__ import annotations

import warnings

import torch.nn as nn

_FUSED: dict[type, type] = {}  # original class -> fused subclass
_ORIGINAL: dict[type, type] = {}  # fused subclass -> original class
_loaded = False


def register_patch(original: type, fused: type) -> None:
    """Make patch() replace modules of class `original` (exactly) by `fused`, a subclass that
    adds no parameters or buffers."""
    if not issubclass(fused, original):
        raise TypeError(f"vitfast.register_patch: argument 'fused' ({fused.__name__}) must subclass "
                        f"'original' ({original.__name__})")
    _FUSED[original] = fused
    _ORIGINAL[fused] = original


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        import timm  # noqa: F401
    except ImportError:
        return
    from . import cait, swin, tiny_vit

    swin.register()
    tiny_vit.register()
    cait.register()


def patch(model: nn.Module, grid: bool = True, head_mix_impl: str = "auto") -> nn.Module:
    """Swap every known attention module (timm swin_* v1, tiny_vit_*, cait_*, registered ones)
    for its fused version in place; returns the model. grid=False keeps the blocks' own window
    partition (the attention alone is fused). head_mix_impl: "auto", "fused" or "sdpa", the
    head_mix_attention route of the talking-heads modules (CaiT; see head_mix_attention's impl).
    Warns when the model has nothing to patch."""
    if head_mix_impl not in ("auto", "fused", "sdpa"):
        raise ValueError("vitfast.patch: argument 'head_mix_impl' must be 'auto', 'fused' or 'sdpa', got "
                         f"{head_mix_impl!r}")
    _load_builtin()
    swapped = 0
    for m in model.modules():
        fused = _FUSED.get(type(m))
        if fused is not None:
            m.__class__ = fused
            swapped += 1
        if type(m) in _ORIGINAL:
            m.vitfast_grid = grid
            m.vitfast_head_mix_impl = head_mix_impl
    if swapped == 0 and not patched_modules(model):
        known = sorted({cls.__name__ for cls in _FUSED})
        warnings.warn(f"vitfast.patch: {type(model).__name__} has no module vitfast can fuse (known: "
                      f"{', '.join(known)}); it runs unchanged", RuntimeWarning, stacklevel=2)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch(): every fused module gets its original class back."""
    for m in model.modules():
        original = _ORIGINAL.get(type(m))
        if original is not None:
            m.__class__ = original
            m.__dict__.pop("vitfast_grid", None)
            m.__dict__.pop("vitfast_head_mix_impl", None)
    return model


def patched_modules(model: nn.Module) -> list[str]:
    """Names of the modules that currently run fused."""
    return [name for name, m in model.named_modules() if type(m) in _ORIGINAL]


def patchable(model: nn.Module) -> list[str]:
    """Names of the modules patch() would swap."""
    _load_builtin()
    return [name for name, m in model.named_modules() if type(m) in _FUSED]
