"""The embedded default teacher: a small ViT (timm's VisionTransformer) for the 16x16 digits.
Registered in timm as `vitfast_digits_vit`; trained by `vitfast train-teacher`."""
from __future__ import annotations

import os

import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from ..data.digits import DIGITS_MEAN, DIGITS_STD

ASSET = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits_vit.safetensors")


@register_model
def vitfast_digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm.create_model's own
        kwargs.pop(key, None)
    cfg = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=192, depth=4, num_heads=3,
               mlp_ratio=4.0)
    cfg.update(kwargs)
    model = VisionTransformer(**cfg)
    # the digits are rendered at exactly 16 x 16: timm's eval transform must not resize and crop them
    model.pretrained_cfg = {"input_size": (1, 16, 16), "crop_pct": 1.0, "mean": (DIGITS_MEAN,), "std": (DIGITS_STD,),
                            "num_classes": cfg["num_classes"]}
    if pretrained:
        load_weights(model, ASSET)
    return model


def digits_vit(**kwargs) -> VisionTransformer:
    return vitfast_digits_vit(**kwargs)


def load_weights(model: torch.nn.Module, path: str) -> torch.nn.Module:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"teacher weights '{path}' not found; train them with `vitfast train-teacher`")
    state = {k: v.float() for k, v in load_file(path).items()}
    model.load_state_dict(state)
    return model


def load_digits_teacher() -> VisionTransformer:
    """The shipped, trained teacher in eval mode."""
    return vitfast_digits_vit(pretrained=True).eval()
