"""timm's RandAugment with Pillow 13: Pillow 13 refuses ImageOps.posterize(bits=0), which timm's
increasing-posterize op ("rand-...-inc1", TinyViT's and DeiT's recipe) draws now and then, so a
training run crashed in its first epoch. Pillow <= 12 returned a black image for 0 bits (keep no
bit); install_posterize_fix() gives timm's posterize ops that meaning again. vitfast calls it
wherever it builds a training transform."""
from __future__ import annotations


def _posterize(img, bits_to_keep, **_):
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:  # keep no bit: every channel value becomes 0 (Pillow <= 12's result)
        return img.point(lambda _v: 0)
    return ImageOps.posterize(img, bits_to_keep)


def install_posterize_fix() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize
