"""Replayable augmentation: the student sees exactly the image the teacher saw.

Every random draw of a sample's augmentation (crop, flip, RandAugment, erasing: stock timm and
torchvision transforms, which draw from Python's `random`, NumPy and torch) happens under RNG
states set from that sample's seed, so the result depends only on (image, seed), not on the
data-loader worker, rank or world size. Mixup/CutMix partners are fixed per epoch (pairs of the
epoch's permutation) and their parameters are drawn under seed_i ^ seed_j with timm's own Mixup.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.seeding import (  # noqa: F401 (this module's API)
    MASK32, augmentation_rng, preserved_rng, reseed, sample_seed, seeded)


def epoch_plan(dataset_size: int, epoch: int, base_seed: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's sample order as (pairs, 2) keys plus a (pairs, 2) mask of canonical entries.

    A permutation seeded by base_seed + epoch, padded by repeating its start to a multiple of
    2 * world_size; rows are mixup partners. Entries at positions < dataset_size are canonical:
    their pairs are the same for every world size (the odd last sample, if any, always pairs with
    the first), so a record made by a teacher on any number of ranks replays on any other. Padded
    entries are extra work for equal rank sizes and are neither stored nor trained on."""
    g = np.random.default_rng(base_seed + epoch)
    perm = g.permutation(dataset_size)
    pad = (-len(perm)) % (2 * world_size)
    if pad:
        perm = np.concatenate([perm, perm[np.arange(pad) % len(perm)]])
    canonical = np.arange(len(perm)) < dataset_size
    return perm.reshape(-1, 2), canonical.reshape(-1, 2)


def rank_slice(plan, rank: int, world_size: int):
    """The pairs (and mask) a rank processes: contiguous equal slices."""
    pairs, canonical = plan
    per = len(pairs) // world_size
    return pairs[rank * per:(rank + 1) * per], canonical[rank * per:(rank + 1) * per]


class ReplayAugment:
    """Applies `transform` to a dataset item under its seed, and mixes pairs with timm's Mixup
    under the pair's seed. `dataset[key]` returns (image, label); labels are not used."""

    def __init__(self, dataset, transform, mixup_args: dict | None = None):
        self.dataset, self.transform = dataset, transform
        self.mixup_args = mixup_args

    def image(self, key: int, seed: int) -> tuple[torch.Tensor, int]:
        with augmentation_rng():
            return self._image(key, seed)

    def _image(self, key: int, seed: int) -> tuple[torch.Tensor, int]:
        img, label = self.dataset[int(key)]
        reseed(seed)
        return self.transform(img), int(label)

    def pair(self, keys, seeds, num_classes: int | None = None):
        """Augmented (and, with mixup, mixed) images of the two samples of a pair, (2, ...), and,
        when num_classes is given, their soft labels (2, num_classes) as timm's Mixup makes them.
        Each image is drawn under its own seed, the mix under the pair's: the same draws as
        seeding each step separately, with the caller's RNG states saved and restored once (in
        the main process; a data-loader worker's RNGs are its own: augmentation_rng)."""
        with augmentation_rng():
            (a, la), (b, lb) = self._image(keys[0], seeds[0]), self._image(keys[1], seeds[1])
            x, y = torch.stack([a, b]), torch.tensor([la, lb])
            if not self.mixup_args:
                t = torch.nn.functional.one_hot(y, num_classes).float() if num_classes else None
                return x, t
            from timm.data import Mixup

            mix = Mixup(**{**self.mixup_args, "mode": "batch"})
            reseed(int(seeds[0]) ^ int(seeds[1]))
            x, t = mix(x, y)
            return x, (t if num_classes else None)


class PairDataset(torch.utils.data.Dataset):
    """Pairs of an epoch plan as data-loader items: (keys (2,), seeds (2,), canonical (2,),
    images (2, ...))."""

    def __init__(self, augment: ReplayAugment, pairs, canonical, epoch: int, base_seed: int,
                 num_classes: int | None = None):
        self.augment, self.pairs, self.canonical = augment, pairs, canonical
        self.epoch, self.base_seed, self.num_classes = epoch, base_seed, num_classes

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        keys = self.pairs[i]
        seeds = [sample_seed(self.base_seed, self.epoch, int(k)) for k in keys]
        x, t = self.augment.pair(keys, seeds, self.num_classes)
        if t is None:
            t = torch.zeros(2, 0)
        return (torch.as_tensor(keys, dtype=torch.int64), torch.as_tensor(seeds, dtype=torch.int64),
                torch.as_tensor(self.canonical[i]), x, t)


def collate_pairs(items):
    """(keys, seeds, canonical, images, soft labels or an empty (n, 0) tensor)."""
    return tuple(torch.cat([item[j] for item in items]) for j in range(5))
