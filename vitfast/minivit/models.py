"""timm names for Mini models trained from scratch, like the official release: Mini-DeiT shares
every 2 layers; Mini-Swin-T all layers of each stage, Mini-Swin-S/B every 2. Random initialisation
(the official recipe: trunc_normal(0.02) transforms, the MLP transform in its official form).
To compress a *pretrained* model, use vitfast.minivit.multiplex / `vitfast minivit` instead."""
from __future__ import annotations

from timm.models import register_model

from ..errors import UserError

RECIPES = {  # name: (base timm model, sharing)
    "mini_deit_tiny_patch16_224": ("deit_tiny_patch16_224", 2),
    "mini_deit_small_patch16_224": ("deit_small_patch16_224", 2),
    "mini_deit_base_patch16_224": ("deit_base_patch16_224", 2),
    "mini_swin_tiny_patch4_window7_224": ("swin_tiny_patch4_window7_224", "stage"),
    "mini_swin_small_patch4_window7_224": ("swin_small_patch4_window7_224", 2),
    "mini_swin_base_patch4_window7_224": ("swin_base_patch4_window7_224", 2),
}


def _mini(name: str, pretrained: bool, **kwargs):
    import timm

    from .multiplex import multiplex

    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's own
        kwargs.pop(key, None)
    if pretrained:
        raise UserError(f"{name}: no pretrained Mini weights are published; make a Mini model from a pretrained "
                        "one with `vitfast minivit --teacher ... --checkpoint ...`")
    base, share = RECIPES[name]
    share = kwargs.pop("share", share)
    model = multiplex(timm.create_model(base, pretrained=False, **kwargs), share, init="random", heads_mix=True,
                      mlp_transform="official")
    model.minivit["base_model"] = base
    return model


def _register(name):
    def fn(pretrained: bool = False, **kwargs):
        return _mini(name, pretrained, **kwargs)
    fn.__name__ = name
    fn.__doc__ = f"MiniViT {RECIPES[name][0]} sharing {RECIPES[name][1]} (random init, official transforms)."
    fn.__module__ = __name__
    return register_model(fn)


for _name in RECIPES:
    globals()[_name] = _register(_name)
