"""The embedded default data set: scikit-learn's bundled handwritten digits (1,797 8x8 images,
10 classes, installed offline with scikit-learn), upsampled to 16x16, with a fixed stratified
train / held-out split."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
DIGITS_MEAN = 0.3053   # of the upsampled images in [0, 1]
DIGITS_STD = 0.3189


def _load_raw():
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in requirements.txt
        raise ImportError("the embedded digits data set needs scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def to_model_input(images01: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] at any size -> normalised (N, 1, 16, 16)."""
    if images01.shape[-1] != IMAGE_SIZE:
        images01 = F.interpolate(images01, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (images01 - DIGITS_MEAN) / DIGITS_STD


def digits_splits(held_out: float = 0.2, seed: int = 0):
    """(train_x, train_y, test_x, test_y): normalised (N, 1, 16, 16) float32 and int64 labels.
    The split is stratified per class and fixed by `seed`."""
    images, labels = _load_raw()
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test_idx.extend(rng.permutation(idx)[: int(round(held_out * len(idx)))])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    x = to_model_input(torch.from_numpy(images)[:, None])
    y = torch.from_numpy(labels)
    return x[~test_mask], y[~test_mask], x[test_mask], y[test_mask]


def export_digits_imagefolder(root: str, split: str = "test", seed: int = 0) -> str:
    """Write a split as an ImageFolder tree (root/<class>/<n>.png, 8-bit grayscale 16x16), the
    format `vitfast lowrank --data` reads."""
    from PIL import Image

    images, labels = _load_raw()
    tr_x, tr_y, te_x, te_y = digits_splits(seed=seed)
    x, y = (te_x, te_y) if split == "test" else (tr_x, tr_y)
    pixels = (x * DIGITS_STD + DIGITS_MEAN).clamp(0, 1).mul(255).round().to(torch.uint8)
    for i in range(x.shape[0]):
        d = os.path.join(root, str(int(y[i])))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(pixels[i, 0].numpy(), mode="L").save(os.path.join(d, f"{i:05d}.png"))
    return root
