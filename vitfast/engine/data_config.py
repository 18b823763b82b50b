"""A model's timm data configuration (mean, std, interpolation, crop) with the input size the model
really takes. timm keeps the registry's size in `pretrained_cfg` when a model is built for another
one (`create_model(..., img_size=32)`), so the size is read off the model's patch embedding, and a
requested --input-size that a fixed-size model cannot take is refused before any work."""
from __future__ import annotations

from torch import nn

from ..errors import UserError


def built_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) a timm model with a fixed-size patch embedding (ViT/DeiT, Swin, CaiT) was built for;
    None where the model takes any size (dynamic_img_size, no strict size) or does not say."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if getattr(model, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
        return None
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return int(size[0]), int(size[1])
    return None


def model_data_config(model: nn.Module, input_size=None, what: str = "--input-size") -> dict:
    """timm's resolve_model_data_config(model) with input_size: the requested (C, H, W) when given
    (refused, naming `what`, where the model is built for another H x W), else the size the model
    was built for."""
    from timm.data import resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    built = built_size(model)
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
        if built is not None and size[1:] != built:
            raise UserError(f"argument {what} {size[1]}x{size[2]}: the model takes {built[0]}x{built[1]} images "
                            f"(it was built for that size); pass {what} {built[0]}, or build the model for "
                            f"{size[1]}x{size[2]} (--model-kwargs img_size={size[1]})")
        cfg["input_size"] = size
    elif built is not None and tuple(cfg["input_size"][1:]) != built:
        cfg["input_size"] = (cfg["input_size"][0], *built)
    return cfg
