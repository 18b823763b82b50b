"""The embedded default for TinyViT distillation: the digits teacher, a smaller digits student,
the digits training split with a light stock augmentation and mixup."""
from __future__ import annotations

import torch
from torchvision import transforms

from ..data.digits import DIGITS_MEAN, DIGITS_STD, digits_splits

BACKGROUND = (0.0 - DIGITS_MEAN) / DIGITS_STD
MIXUP = {"mixup_alpha": 0.4, "cutmix_alpha": 0.0, "prob": 1.0, "num_classes": 10, "label_smoothing": 0.0}
STUDENT = {"embed_dim": 96, "depth": 2, "num_heads": 3}


def digits_train_set():
    tr_x, tr_y, te_x, te_y = digits_splits(seed=0)
    return torch.utils.data.TensorDataset(tr_x, tr_y), (te_x, te_y)


def digits_transform():
    # stock torchvision: small rotations and shifts, drawn from torch's RNG
    return transforms.RandomAffine(degrees=10, translate=(0.125, 0.125), fill=BACKGROUND)


def digits_student():
    from ..models.digits_vit import vitfast_digits_vit

    return vitfast_digits_vit(**STUDENT)


# TinyViT's ImageNet recipe (the paper's Table 11 / official config): what save-logits uses unless
# told otherwise; size, mean, std and interpolation come from the teacher's timm data config
RECIPE = {"aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0}


def recipe_for(model, input_size=None, **options) -> dict:
    """The augmentation recipe a store is written with, JSON-able (store.json keeps it, and every
    student replays it): the model's timm data config plus TinyViT's augmentation, options
    overriding (aa, reprob, mixup, cutmix; None keeps the default)."""
    from ..engine.data_config import model_data_config

    cfg = model_data_config(model, input_size)
    size = list(cfg["input_size"])
    recipe = {"input_size": size, "mean": list(cfg["mean"]), "std": list(cfg["std"]),
              "interpolation": cfg.get("interpolation", "bicubic"), **RECIPE}
    recipe.update({k: v for k, v in options.items() if v is not None})
    if recipe["aa"] in ("none", ""):
        recipe["aa"] = None
    return recipe


def replay_data(data: str | None, recipe: dict | None = None):
    """(dataset of raw images, augmentation, mixup args, eval set or None) that save-logits and
    every student replay: the embedded digits, or an ImageFolder augmented by `recipe`
    (`recipe_for`; a store keeps the one it was written with; `recipe["unlabeled"]`: every image
    under the folder, labels 0, as ImageFiles)."""
    if not data:
        ds, eval_set = digits_train_set()
        return ds, digits_transform(), MIXUP, eval_set
    from timm.data import create_transform

    from ..data.augment import install_posterize_fix
    from ..data.folders import image_files, image_folder

    if recipe is None:
        raise ValueError("replay_data: an ImageFolder needs the augmentation recipe (recipe_for(model) or the store's)")
    install_posterize_fix()
    if recipe.get("unlabeled"):  # soft labels only (TinyViT distils without ground truth)
        ds = image_files(data, what="--data")
    else:
        ds = image_folder(data, what="--data")
    size = tuple(recipe["input_size"])
    tf = create_transform(size, is_training=True, auto_augment=recipe["aa"], re_prob=recipe["reprob"],
                          interpolation=recipe["interpolation"], mean=tuple(recipe["mean"]), std=tuple(recipe["std"]))
    if size[0] == 1:  # grayscale models: the folder's RGB images as one channel
        from torchvision import transforms

        tf = transforms.Compose([transforms.Grayscale(1), tf])
    mix = {"mixup_alpha": recipe["mixup"], "cutmix_alpha": recipe["cutmix"], "prob": 1.0, "switch_prob": 0.5,
           "num_classes": max(1, len(ds.classes)), "label_smoothing": 0.0}  # unlabeled: every label is 0
    return ds, tf, mix, None


def store_recipe(root: str) -> dict | None:
    """The augmentation recipe a store was written with (stores written before recipes were kept:
    TinyViT's recipe at 224 with ImageNet's mean and std, what save-logits used then)."""
    from .store import read_meta

    aug = read_meta(root).augmentation or {}
    if "recipe" in aug:
        return aug["recipe"]
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {"input_size": [3, 224, 224], "mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD),
            "interpolation": "bicubic", **RECIPE}
