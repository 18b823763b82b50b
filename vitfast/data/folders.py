"""ImageFolder data as tensors, for the few-shot pipelines (a proxy set of ~2,000 images fits in
memory): decoding once up front keeps every later pass over the set cheap."""
from __future__ import annotations

import os

import torch
from torchvision import datasets, transforms


def image_folder_tensors(root: str, image_size: int, channels: int = 3, mean=None, std=None,
                         limit: int | None = None, seed: int = 0, workers: int = 0):
    """Load an ImageFolder directory as (images (N, C, S, S) float32 normalised, labels (N,)).

    Resize (shorter side) + centre crop to image_size. A random subset of `limit` images (fixed by
    `seed`) when the folder holds more."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    mean = mean if mean is not None else ([0.485, 0.456, 0.406] if channels == 3 else [0.5])
    std = std if std is not None else ([0.229, 0.224, 0.225] if channels == 3 else [0.5])
    tf = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if channels == 1:
        tf.append(transforms.Grayscale(1))
    tf += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        ds = datasets.ImageFolder(root, transform=transforms.Compose(tf))
    except (FileNotFoundError, RuntimeError) as exc:
        raise ValueError(f"data folder '{root}' holds no images in class sub-folders ({exc})") from exc
    if len(ds) == 0:
        raise ValueError(f"data folder '{root}' holds no images")
    idx = torch.arange(len(ds))
    if limit is not None and limit < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx.tolist()), batch_size=256,
                                         num_workers=workers)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)
