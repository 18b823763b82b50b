"""ImageFolder data, checked: a missing, empty or malformed folder, or an unreadable file, is a
one-line user error naming it (the transforms are timm's: vitfast.engine.evaluation / data).
Unlabeled data (the low-rank proxy images) may also be a plain folder of images."""
from __future__ import annotations

import os

import torch
from torchvision import datasets

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Folder names that split a data set: a root holding only these is a data set's root, not an ImageFolder.
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "eval", "evaluation", "dev"}


def _is_image(name: str) -> bool:
    # hidden files are not images of the data set: macOS's "._x.jpg" (AppleDouble) look like JPEGs and
    # stopped a run where the loader reached them
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _is_image_path(path: str) -> bool:
    return _is_image(os.path.basename(path))


def _visible_dirs(root: str) -> list[str]:
    # hidden folders (.ipynb_checkpoints, .git, .cache) are no classes
    return sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))


def _scan(folder: str) -> tuple[int, list[str]]:
    """(image files under `folder`, at any depth, as ImageFolder counts them; up to 3 other files)."""
    images, others = 0, []
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in files:
            if _is_image(f):
                images += 1
            elif len(others) < 3:
                others.append(os.path.join(dirpath, f))
    return images, others


def _has_image(folder: str) -> bool:
    """Whether `folder` holds an image at any depth (stops at the first: data sets are large)."""
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_is_image(f) for f in files):
            return True
    return False


def _names(items: list[str], limit: int = 3) -> str:
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(repr(x) for x in items[:limit]) + more


def check_image_folder(root: str, what: str = "data folder") -> list[str]:
    """The class names of an ImageFolder tree, or a UserError saying what is wrong with it:
    missing, not a folder, no class sub-folders, a data set's root (train/ val/) instead of one
    split, a class folder without images, or no image files at all (naming what is there instead)."""
    from ..errors import UserError

    _check_exists(root, what)
    classes = _visible_dirs(root)
    if not classes:
        loose = sum(1 for d in os.scandir(root) if d.is_file() and _is_image(d.name))
        hint = (f": its {loose} images lie directly in it; put them in one sub-folder per class" if loose
                else " (an ImageFolder: one sub-folder of images per class)")
        raise UserError(f"{what} '{root}' has no class sub-folders{hint}")
    counts, others = {}, []
    for c in classes:
        counts[c], found = _scan(os.path.join(root, c))
        others += [os.path.relpath(p, root) for p in found][:3 - len(others)]
    if sum(counts.values()) == 0:
        found = f" (found e.g. {', '.join(others)})" if others else ""
        raise UserError(f"{what} '{root}' holds no image files in its {len(classes)} class folder(s){found}")
    check_not_splits(root, classes, what)
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise UserError(f"{what} '{root}': class folder(s) {_names(empty)} hold no image files (every class folder "
                        f"needs images: remove {'it' if len(empty) == 1 else 'them'} or add images)")
    return classes


def class_folders(root: str) -> list[str]:
    """The sub-folders of `root` that hold images (at any depth), sorted; [] for a plain folder of
    images (or a missing one)."""
    if not os.path.isdir(root):
        return []
    return [d for d in _visible_dirs(root) if _has_image(os.path.join(root, d))]


def check_not_splits(root: str, folders: list[str], what: str) -> None:
    """Refuses a data set's root (train/ val/, each a tree of class folders) given for one split:
    ImageFolder would take the splits for classes, and any reader would mix in the validation images."""
    from ..errors import UserError

    if folders and set(folders) <= SPLIT_NAMES and all(_holds_class_folders(os.path.join(root, c)) for c in folders):
        pick = "train" if "train" in folders else folders[0]
        raise UserError(f"{what} '{root}' holds the splits {_names(folders)} of a data set, each a tree of class "
                        f"folders; give one split, e.g. '{os.path.join(root, pick)}'")


def _check_exists(root: str, what: str) -> None:
    from ..errors import UserError

    if not os.path.exists(root):
        raise UserError(f"{what} '{root}' does not exist")
    if not os.path.isdir(root):
        raise UserError(f"{what} '{root}' is not a folder (an ImageFolder: one sub-folder of images per class)")


def _holds_class_folders(folder: str) -> bool:
    """True when `folder` has no images of its own but sub-folders that hold some."""
    entries = list(os.scandir(folder))
    if any(e.is_file() and _is_image(e.name) for e in entries):
        return False
    return any(e.is_dir() and not e.name.startswith(".") and _has_image(e.path) for e in entries)


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
    check_image_folder(root, what)
    return VisibleImageFolder(root, transform=transform, loader=checked_loader, is_valid_file=_is_image_path)


class VisibleImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder without hidden folders or files (.ipynb_checkpoints was a class)."""

    def find_classes(self, directory: str):
        classes = _visible_dirs(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples = datasets.ImageFolder.make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        return [(p, t) for p, t in samples  # nothing under a hidden sub-folder (.thumbs/) either
                if not any(part.startswith(".") for part in os.path.relpath(p, directory).split(os.sep))]


class ImageFiles(torch.utils.data.Dataset):
    """Every image file under a folder (sorted relative paths, any depth) with label 0: unlabeled
    images kept in a plain folder. Has `samples` and `root` like an ImageFolder."""

    def __init__(self, root: str, transform=None):
        self.root, self.transform = root, transform
        paths = []
        for dirpath, dirnames, files in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            paths += [os.path.join(dirpath, f) for f in sorted(files) if _is_image(f)]
        self.samples = [(p, 0) for p in paths]
        self.targets = [0] * len(paths)
        self.classes = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = checked_loader(self.samples[i][0])
        return (self.transform(img) if self.transform is not None else img), 0


def image_files(root: str, transform=None, what: str = "data folder") -> ImageFiles:
    """Every image under `root` as unlabeled images (ImageFiles), checked: a missing folder, a
    data set's root (train/ val/) or a folder without images is a UserError naming it."""
    from ..errors import UserError

    _check_exists(root, what)
    check_not_splits(root, class_folders(root), what)
    ds = ImageFiles(root, transform)
    if not ds.samples:
        images, others = _scan(root)
        found = f" (found e.g. {', '.join(os.path.relpath(p, root) for p in others)})" if others else ""
        raise UserError(f"{what} '{root}' holds no image files{found}")
    return ds


def unlabeled_images(root: str, transform=None, what: str = "data folder"):
    """Images whose labels are not used: an ImageFolder tree (its order; a class folder without
    images is no error here), or else every image under `root` (image_files), a plain folder of
    images. A data set's root (train/ val/) is refused as in check_image_folder."""
    _check_exists(root, what)
    folders = class_folders(root)
    loose = any(d.is_file() and _is_image(d.name) for d in os.scandir(root))
    if folders and not loose:
        check_not_splits(root, folders, what)
        return VisibleImageFolder(root, transform=transform, loader=checked_loader, allow_empty=True,
                                  is_valid_file=_is_image_path)
    return image_files(root, transform, what)


def lies_within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (links resolved; a common prefix is not a parent)."""
    a, b = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([a, b]) == b


def overlap_note(data: str | None, eval_data: str | None, reads: str = "the training reads") -> str | None:
    """A line to print when the evaluation folder is the training folder or lies inside it (or it
    inside the evaluation folder): the accuracies would be measured on images trained on (`reads`:
    how the command uses --data)."""
    if not data or not eval_data:
        return None
    if os.path.realpath(data) == os.path.realpath(eval_data):
        how = "is --data"
    elif lies_within(eval_data, data):
        how = "lies inside --data"
    elif lies_within(data, eval_data):
        how = "holds --data"
    else:
        return None
    return f"note: --eval-data '{eval_data}' {how}: its accuracy is measured on images {reads}"
