"""Which sample sits at each index of a data set, in a few bytes: a logit store's soft labels are
matched to images by position, so a store read against another folder of the same size (a file
renamed, moved to another class, added and another removed) would train on wrong labels silently.
save-logits records this identity; every reader compares it to its own data. (Unlike
vitfast.engine.folder_digest, which says whether a resumed run reads the same folder, this follows
the data set object: which file is sample i, and its class.)"""
from __future__ import annotations

import hashlib
import os
from collections import Counter

import numpy as np
import torch


def _image_folder_identity(dataset) -> dict:
    # Paths relative to the root, so the folder can move (another disk, another node's mount).
    h = hashlib.sha256()
    prefix = os.path.join(os.path.expanduser(os.fspath(dataset.root)), "")  # how torchvision joined them
    for path, target in dataset.samples:
        rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, dataset.root)
        h.update(f"{rel.replace(os.sep, '/')}\t{int(target)}\n".encode())
    classes = list(getattr(dataset, "classes", []))
    if not classes:  # vitfast.data.folders.ImageFiles: unlabeled images
        return {"kind": "unlabeled images", "sha256": h.hexdigest(), "class_counts": {}}
    counts = Counter(int(t) for _, t in dataset.samples)
    return {"kind": "image folder", "sha256": h.hexdigest(),
            "class_counts": {(classes[t] if t < len(classes) else str(t)): n for t, n in sorted(counts.items())}}


def _tensor_identity(tensors) -> dict:
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous()
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    counts = {}
    if len(tensors) > 1 and tensors[-1].dim() == 1 and not tensors[-1].is_floating_point():
        values, n = np.unique(tensors[-1].cpu().numpy(), return_counts=True)
        counts = {str(int(v)): int(c) for v, c in zip(values, n)}
    return {"kind": "tensors", "sha256": h.hexdigest(), "class_counts": counts}


def data_identity(dataset) -> dict | None:
    """{"kind", "sha256", "class_counts"} of an ImageFolder (relative file paths and classes, in
    index order), a TensorDataset (its bytes) or a Subset of either (the picked indices too); None
    for a data set that cannot say what it holds."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = data_identity(dataset.dataset)
        if inner is None:
            return None
        h = hashlib.sha256(inner["sha256"].encode())
        h.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        return {"kind": f"subset of {inner['kind']}", "sha256": h.hexdigest(), "class_counts": {}}
    if hasattr(dataset, "samples") and hasattr(dataset, "root"):
        return _image_folder_identity(dataset)
    if isinstance(getattr(dataset, "tensors", None), tuple):
        return _tensor_identity(dataset.tensors)
    return None


def identity_mismatch(stored: dict | None, here: dict | None) -> str | None:
    """Why `here` is not the data `stored` describes, or None when they match or either is unknown."""
    if not stored or not here or stored.get("sha256") == here.get("sha256"):
        return None
    if stored.get("kind") != here.get("kind"):
        return f"it was written for {stored.get('kind')} data, these are {here.get('kind')}"
    a, b = stored.get("class_counts") or {}, here.get("class_counts") or {}
    diff = [f"'{c}': {a.get(c, 0)} stored, {b.get(c, 0)} here" for c in sorted(set(a) | set(b)) if a.get(c) != b.get(c)]
    if diff:
        more = f" (and {len(diff) - 5} more classes)" if len(diff) > 5 else ""
        return "images per class differ: " + "; ".join(diff[:5]) + more
    if not a:  # unlabeled images, tensors: no classes to compare
        return "other files or another order (renamed, moved or replaced images)"
    return "the same number of images per class, but other files or another order (renamed, moved or replaced images)"
