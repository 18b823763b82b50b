"""Streaming evaluation: an ImageFolder through a DataLoader with the model's own timm data
configuration (resize, crop, interpolation, mean/std: what timm's validate.py uses), memory
bounded whatever the folder size; top-1 / top-5 by timm.utils.accuracy."""
from __future__ import annotations

import torch
from torch import nn

from . import sigterm
from .trainer import autocast_for


def eval_transform(model: nn.Module, input_size=None):
    from timm.data import create_transform

    from .data_config import model_data_config

    cfg = model_data_config(model, input_size)
    return create_transform(**cfg, is_training=False), cfg


def folder_tensors(root: str, model: nn.Module, limit: int | None = None, seed: int = 0, input_size=None,
                   workers: int = 0):
    """(images, labels) of an ImageFolder (a random subset of `limit`, fixed by `seed`) through the
    model's timm evaluation transform, in memory: for small sets that every stage reuses (the
    low-rank proxy set). Labels are not checked: any class folders, or a plain folder of images
    (labels 0)."""
    ds = _folder(root, model, input_size, "--data", unlabeled=True)
    idx = list(range(len(ds)))
    if limit is not None and limit < len(ds):
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].sort().values.tolist()
    sub = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=256, num_workers=workers,
                                      worker_init_fn=sigterm.worker_init)
    xs, ys = zip(*sub)
    return torch.cat(xs), torch.cat(ys)


def match_classes(ds, train_classes: list[str] | None, num_classes: int | None, what: str = "--eval-data") -> None:
    """Labels of an evaluation ImageFolder that mean what the model's outputs mean, checked before
    any work (a label past the head used to fail at the first evaluation, after an epoch of
    training; a folder of other classes was scored silently).

    train_classes (the training folder's names): the evaluation folders are matched by name, so a
    subset of the classes is scored correctly; a name the training data lacks is refused.
    Without them (the head's own order): the folders, in sorted order, must be as many as the head's
    outputs."""
    from ..errors import UserError

    found = list(ds.classes)
    if train_classes is not None and found != list(train_classes):
        index = {c: i for i, c in enumerate(train_classes)}
        unknown = [c for c in found if c not in index]
        if unknown:
            more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
            raise UserError(f"argument {what}: class folder(s) {', '.join(map(repr, unknown[:3]))}{more} are not "
                            f"classes of the training data ({len(train_classes)} classes, e.g. "
                            f"{', '.join(map(repr, train_classes[:3]))}); labels are matched by folder name")
        remap = [index[c] for c in found]
        ds.samples = [(path, remap[t]) for path, t in ds.samples]
        ds.imgs, ds.targets = ds.samples, [t for _, t in ds.samples]
        ds.classes, ds.class_to_idx = list(train_classes), dict(index)
    elif train_classes is None and num_classes is not None and len(found) != num_classes:
        raise UserError(f"argument {what}: {len(found)} class folder(s), the model's head has {num_classes} outputs; "
                        "the folders are matched to the outputs in sorted order, so there must be one per output")
    if num_classes is not None and ds.targets and max(ds.targets) >= num_classes:
        raise UserError(f"argument {what}: class {ds.classes[max(ds.targets)]!r} is label {max(ds.targets)}, "
                        f"past the model's {num_classes} outputs")


def folder_loader(root: str, model: nn.Module, batch_size: int = 128, workers: int = 4, input_size=None,
                  train_classes: list[str] | None = None, what: str = "--eval-data"):
    """A DataLoader over an evaluation ImageFolder whose labels are checked against the model's
    head (and matched by name to `train_classes` when given: match_classes)."""
    ds = _folder(root, model, input_size, what)
    match_classes(ds, train_classes, getattr(model, "num_classes", None) or None, what)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=sigterm.worker_init)


def _folder(root: str, model: nn.Module, input_size, what: str, unlabeled: bool = False):
    """The ImageFolder (unlabeled: or a plain folder of images) through the model's timm
    evaluation transform."""
    from ..data.folders import image_folder, unlabeled_images

    tf, cfg = eval_transform(model, input_size)
    if cfg["input_size"][0] == 1:  # grayscale models (the embedded digits)
        from torchvision import transforms

        tf = transforms.Compose([transforms.Grayscale(1), tf])
    return (unlabeled_images if unlabeled else image_folder)(root, tf, what)


@torch.no_grad()
def evaluate(model: nn.Module, batches, device, amp_dtype: str = "bfloat16") -> dict:
    """Top-1, top-5 (when there are >= 5 classes) and cross-entropy over (images, labels) batches."""
    from timm.utils import accuracy

    device = torch.device(device)
    was_training = model.training
    model.eval()
    top1 = top5 = loss = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    for x, y in sigterm.iterate(batches):  # its workers outlive a scheduler's SIGTERM (fit saves after this)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_for(device, amp_dtype):
            out = model(x)
        out = out.float()
        k = min(5, out.shape[-1])
        a1, ak = accuracy(out, y, topk=(1, k))
        top1 = top1 + a1 * len(y) / 100
        top5 = top5 + ak * len(y) / 100
        loss = loss + torch.nn.functional.cross_entropy(out, y, reduction="sum")
        n += len(y)
    model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "images": 0}
    return {"top1": (top1 / n).item(), "top5": (top5 / n).item(), "loss": (loss / n).item(), "images": n}


def tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256):
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]
