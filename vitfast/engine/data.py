"""Training data for the engine: a DataLoader per epoch (seeded shuffling, DistributedSampler
under torchrun, worker processes), in-memory tensors with a per-sample transform, and timm's
training transform from the model's own data configuration."""
from __future__ import annotations

import itertools
import math

import torch

from .. import distributed as vdist
from ..data.seeding import augmentation_rng, reseed, sample_seed
from ..errors import UserError
from . import sigterm


class TransformedTensors(torch.utils.data.Dataset):
    """(images, labels) tensors with a transform applied per sample (torchvision tensor ops)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform
        self.classes = sorted({int(v) for v in labels.tolist()})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), self.labels[i]


class SeededSamples(torch.utils.data.Dataset):
    """`dataset[i]` of `epoch` under RNG states seeded from (seed, epoch, i) (vitfast.data.seeding):
    its random augmentation is the same whichever worker, and however many, load it, and the
    loading process's own RNG streams are left as they were."""

    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        with augmentation_rng():
            reseed(sample_seed(self.seed, self.epoch, int(i)))
            return self.dataset[i]


def steps_per_epoch(size: int, batch_size: int, drop_last: bool = True) -> int:
    _, world = vdist.rank_world()
    per_rank = math.ceil(size / world) if world > 1 else size
    steps = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    if steps == 0:
        raise UserError(f"argument --batch-size {batch_size} is larger than the {per_rank} training samples per "
                        "process: use a smaller batch")
    return steps


class FromIndex(torch.utils.data.Sampler):
    """`sampler`'s indices from the `skip`-th on. It draws what `sampler` draws (the whole
    permutation), so the indices that follow are the ones an unskipped epoch yields there."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def epoch_loader(dataset, batch_size: int, epoch: int, seed: int, workers: int = 0, drop_last: bool = True,
                 start: int = 0):
    """This rank's batches of `epoch`: shuffled by (seed, epoch), each sample augmented under its
    own seed (SeededSamples), so the batches are the same on every run and for any --workers.
    start=k: from the epoch's k-th batch on (a resumed epoch: no earlier sample is loaded)."""
    if batch_size < 1:
        raise UserError(f"argument --batch-size must be >= 1, got {batch_size}")
    rank, world = vdist.rank_world()
    dataset = SeededSamples(dataset, seed, epoch)
    generator = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                                      drop_last=True)
        sampler.set_epoch(epoch)
    else:  # what DataLoader(shuffle=True, generator=...) makes: the same order
        generator = torch.Generator().manual_seed(seed * 1000003 + epoch)
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    if start:
        sampler = FromIndex(sampler, start * batch_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       generator=generator, num_workers=workers, drop_last=drop_last,
                                       pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                       worker_init_fn=sigterm.worker_init)


def train_transform(model, input_size=None, aa: str | None = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                    interpolation: str | None = None):
    """timm's training transform with the model's mean/std, interpolation and input size."""
    from timm.data import create_transform

    from ..data.augment import install_posterize_fix
    from .data_config import model_data_config

    install_posterize_fix()
    cfg = model_data_config(model, input_size)
    size = tuple(cfg["input_size"])
    tf = create_transform(size, is_training=True, auto_augment=aa, re_prob=reprob, mean=cfg["mean"],
                          std=cfg["std"], interpolation=interpolation or cfg.get("interpolation", "bicubic"))
    if size[0] == 1:  # grayscale models (the embedded digits): the folder's RGB images as one channel
        from torchvision import transforms

        tf = transforms.Compose([transforms.Grayscale(1), tf])
    return tf
