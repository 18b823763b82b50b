"""ImageFolder data, checked: a missing, empty or malformed folder, or an unreadable file, is a
one-line user error naming it (the transforms are timm's: vitfast.engine.evaluation / data)."""
from __future__ import annotations

import os

from torchvision import datasets

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
