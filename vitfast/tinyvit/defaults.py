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
