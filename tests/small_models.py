"""A user's inputs in miniature for the command-line tests: an ImageFolder of random PNG files and
a timm ViT built for 32 x 32 images saved as safetensors (its timm name still says 224)."""
from __future__ import annotations

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

# --model-kwargs of a 2-block ViT for 32 x 32 images (timm name: vit_tiny_patch16_224)
VIT32 = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=48", "num_heads=3"]


def random_image_folder(root, classes: int = 2, per_class: int = 8, size: int = 40, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return str(root)


def vit32_kwargs() -> dict:
    return {k: int(v) for k, v in (a.split("=") for a in VIT32)}


def save_vit32(path, num_classes: int = 2, seed: int = 0) -> str:
    torch.manual_seed(seed)
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **vit32_kwargs()).state_dict(), str(path))
    return str(path)
