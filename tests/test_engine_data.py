"""The engine's training loader: every sample is augmented under its own seed, so an epoch's
batches do not depend on --workers, and loading leaves the training process's RNG streams alone."""
import random

import numpy as np
import torch
from torchvision import transforms

from vitfast.engine.data import SeededSamples, epoch_loader


class NumpyJitter(torch.utils.data.Dataset):
    """Random draws from all three RNGs a transform may use (torchvision: torch; timm's
    RandAugment: Python's random; others: NumPy)."""

    def __init__(self, n=24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 8, 8, generator=g)
        self.shift = transforms.RandomAffine(degrees=0, translate=(0.25, 0.25))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.shift(self.x[i]) + random.random() + float(np.random.rand())
        return x, i


def batches(workers, epoch=3, seed=7):
    return [(x.clone(), y.clone()) for x, y in epoch_loader(NumpyJitter(), 5, epoch, seed, workers=workers)]


def test_batches_are_the_same_for_any_number_of_workers():
    ref = batches(0)
    assert len(ref) == 4  # 24 samples, drop_last
    for workers in (1, 2):
        got = batches(workers)
        assert len(got) == len(ref), workers
        for (xa, ya), (xb, yb) in zip(ref, got):
            assert torch.equal(ya, yb) and torch.equal(xa, xb), workers
    # the augmentation is random all the same: other epochs and seeds draw other images
    assert not torch.equal(batches(0, epoch=4)[0][0], ref[0][0])
    assert not torch.equal(batches(0, seed=8)[0][0], ref[0][0])
    # a sample's draw depends on (seed, epoch, index) only, not on the order it is asked in
    ds = SeededSamples(NumpyJitter(), 7, 3)
    first = ds[5][0]
    for i in (0, 9, 5, 2):
        ds[i]
    assert torch.equal(ds[5][0], first)


def test_loading_in_the_main_process_leaves_its_rng_streams_alone():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    batches(0)
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_fit_iterates_each_epochs_batches_once(tmp_path, monkeypatch):
    """tqdm.auto's bar calls iter() on what it is given, and again to loop: handed a DataLoader, a
    second set of workers started each epoch and the order depended on --workers. The bar is
    handed one iterator, drawn as a bar, as log lines or not at all."""
    from torch import nn

    from vitfast.engine import TrainConfig, fit

    calls = []

    class Counted:
        def __init__(self, epoch):
            self.items = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
            self.epoch = epoch

        def __len__(self):
            return len(self.items)

        def __iter__(self):
            calls.append(self.epoch)
            return iter(self.items)

    def loss_fn(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x), y), len(y), {}

    for progress, how in ((False, "bar"), (True, "bar"), (True, "lines")):
        monkeypatch.setenv("VITFAST_PROGRESS", how)
        calls.clear()
        fit(nn.Linear(3, 2), TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0), batches=Counted, steps_per_epoch=2,
            loss_fn=loss_fn, device="cpu", out_dir=str(tmp_path / f"{progress}{how}"), progress=progress,
            log=lambda *_: None)
        assert calls == [0, 1], (progress, how, calls)


class AfterTheScope(torch.utils.data.Dataset):
    """What the RNG gives right after a sample's augmentation scope."""

    def __len__(self):
        return 2

    def __getitem__(self, i):
        from vitfast.data.seeding import augmentation_rng, reseed

        with augmentation_rng():
            reseed(100 + i)
            torch.rand(1)
        return torch.rand(1)


def test_the_augmentation_scope_restores_the_callers_rngs_only_in_the_main_process():
    """In the main process the caller's streams go on as if nothing had been drawn; a worker's
    RNGs serve the data set alone, so nothing is saved and restored there (it cost 0.07 ms)."""
    from vitfast.data.seeding import reseed

    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(AfterTheScope()[0], expected)
    reseed(101)
    torch.rand(1)
    unrestored = torch.rand(1)  # the second draw of sample 1's own stream
    got = list(torch.utils.data.DataLoader(AfterTheScope(), batch_size=None, num_workers=1))
    assert torch.equal(got[1], unrestored)


def test_a_loader_started_at_batch_k_gives_the_epochs_batches_from_k():
    """epoch_loader(start=k), what a run resumed within an epoch reads: the uninterrupted epoch's
    batches from the k-th on, bit for bit, without loading the first k (workers or not)."""
    ref = batches(0)
    for workers in (0, 2):
        for k in (1, 3, 4):
            got = [(x.clone(), y.clone()) for x, y in epoch_loader(NumpyJitter(), 5, 3, 7, workers=workers, start=k)]
            assert len(got) == len(ref) - k, (workers, k)
            for (xa, ya), (xb, yb) in zip(ref[k:], got):
                assert torch.equal(ya, yb) and torch.equal(xa, xb), (workers, k)

    class Counting(NumpyJitter):
        loaded = []

        def __getitem__(self, i):
            self.loaded.append(i)
            return super().__getitem__(i)

    list(epoch_loader(Counting(), 5, 3, 7, start=3))
    assert sorted(Counting.loaded) == sorted(ref[3][1].tolist())


def test_a_distributed_sampler_started_at_index_k():
    from vitfast.engine.data import FromIndex

    for rank in (0, 1):
        full = torch.utils.data.DistributedSampler(range(23), num_replicas=2, rank=rank, seed=5, drop_last=True)
        full.set_epoch(4)
        assert list(FromIndex(full, 6)) == list(full)[6:] and len(FromIndex(full, 6)) == len(full) - 6
