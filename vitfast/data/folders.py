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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def check_image_folder(root: str, what: str = "data folder") -> list[str]:
    """The class names of an ImageFolder tree, or a UserError saying what is wrong with it:
    missing, not a folder, no class sub-folders, or no image files (naming what is there instead)."""
    from ..errors import UserError

    if not os.path.exists(root):
        raise UserError(f"{what} '{root}' does not exist")
    if not os.path.isdir(root):
        raise UserError(f"{what} '{root}' is not a folder (an ImageFolder: one sub-folder of images per class)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise UserError(f"{what} '{root}' has no class sub-folders (an ImageFolder: one sub-folder of images per class)")
    images, others = 0, []
    for c in classes:
        for dirpath, _, files in os.walk(os.path.join(root, c)):
            for f in files:
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    images += 1
                elif len(others) < 3:
                    others.append(os.path.join(os.path.relpath(dirpath, root), f))
    if images == 0:
        found = f" (found e.g. {', '.join(others)})" if others else ""
        raise UserError(f"{what} '{root}' holds no image files in its {len(classes)} class folder(s){found}")
    return classes


def checked_loader(path: str):
    """torchvision's default image loader, with a unreadable file named in a UserError."""
    from torchvision.datasets.folder import default_loader

    from ..errors import UserError

    try:
        return default_loader(path)
    except Exception as exc:
        raise UserError(f"image '{path}' cannot be read ({type(exc).__name__}: {exc})") from exc


def image_folder(root: str, transform=None, what: str = "data folder"):
    """torchvision ImageFolder after check_image_folder, reading images with checked_loader."""
    from torchvision import datasets

    check_image_folder(root, what)
    return datasets.ImageFolder(root, transform=transform, loader=checked_loader)
