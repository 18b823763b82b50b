"""Per-sample RNG seeding: a sample's random augmentation draws from Python's `random`, NumPy and
torch (CPU) under states set from (base seed, epoch, sample index) alone, so the image does not
depend on the data-loader worker, the number of workers, the rank or the world size, and the
caller's own RNG streams (dropout, drop-path, mixup) are left as they were. TinyViT's logit store
records these seeds (vitfast.tinyvit.replay); every training loader of vitfast.engine uses them."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

MASK32 = 0xFFFFFFFF


def sample_seed(base_seed: int, epoch: int, key: int) -> int:
    """A 32-bit seed per (epoch, sample) (splitmix64 of the three), stable across runs."""
    x = (base_seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + key * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & MASK32


def reseed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU) RNGs from `seed` (the caller restores them: preserved_rng)."""
    random.seed(seed)
    np.random.seed(seed & MASK32)
    # the CPU generator alone (what the transforms draw from, and all that preserved_rng restores):
    # torch.manual_seed would also queue lazy CUDA/XPU/MTIA seeding, each capturing a Python stack
    # trace -- 63% of save-logits' time on the embedded default -- and change the CUDA RNG unrestored
    torch.default_generator.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng():
    """Run a block that reseeds the RNGs, restoring the caller's RNG states afterwards (saving and
    restoring them costs more than seeding: once per pair, not per seed)."""
    py, np_state, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.random.set_rng_state(th)


@contextlib.contextmanager
def augmentation_rng():
    """The RNG scope of a sample's (or a pair's) augmentation, which reseeds inside it: in the main
    process the caller's states are saved and restored (preserved_rng); in a data-loader worker,
    whose RNGs serve the dataset alone, nothing is (saving and restoring the three states cost
    0.07 ms, ten reseeds: timeit on the 2-core machine)."""
    if torch.utils.data.get_worker_info() is not None:
        yield
    else:
        with preserved_rng():
            yield


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with Python, NumPy and torch (CPU) RNGs seeded from `seed`, restoring the
    caller's RNG states afterwards."""
    with preserved_rng():
        reseed(seed)
        yield
