"""engine.fit with checkpoint_every: a run stopped within an epoch resumes at its last saved step
and ends with the weights of an uninterrupted run, bit for bit -- with the data drawn in the main
process or in workers, dropout, NumPy and `random` in the loss, and under DDP (each rank's
streams)."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vitfast.engine import TrainConfig, fit
from vitfast.engine.trainer import CHECKPOINT, STEP_CHECKPOINT

STEPS = 10  # per epoch


class NoisyData(Dataset):
    """Random augmentation drawn from the torch stream of whichever process loads the sample."""

    def __init__(self, n=40):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(8), self.y[i]


class Stop(Exception):
    pass


def _train(out, workers=0, stop_at=None, rank=0, world=1):
    """Two epochs of a small model with dropout; stop_at=(epoch, step) raises there (a kill)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 3))
    data = NoisyData(40 * world)
    lines = []

    def batches(epoch):
        sampler = torch.utils.data.DistributedSampler(data, world, rank, seed=epoch) if world > 1 else None
        return DataLoader(data, batch_size=4, shuffle=sampler is None, sampler=sampler, num_workers=workers)

    seen = {"n": 0}

    def loss_fn(m, batch):
        seen["n"] += 1
        if stop_at is not None and seen["n"] == stop_at:
            raise Stop
        x, y = batch
        x = x * (1 + 0.1 * float(np.random.rand())) + 0.01 * random.random()  # Mixup-like draws
        loss = nn.functional.cross_entropy(m(x), y)
        return loss, len(y), {"half": loss / 2}

    cfg = TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0.5, checkpoint_every=3)
    result = fit(model, cfg, batches=batches, steps_per_epoch=STEPS, loss_fn=loss_fn, device="cpu", out_dir=out,
                 log=lines.append, progress=False)
    return model.state_dict(), result.history, lines


def _same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_stopped_within_an_epoch_resumes_at_its_step_exactly(tmp_path, workers):
    whole, history, _ = _train(str(tmp_path / "whole"), workers)
    out = str(tmp_path / "stopped")
    # stopped at step 5 of epoch 1 (its step checkpoint: after step 3; no epoch checkpoint yet)
    with pytest.raises(Stop):
        _train(out, workers, stop_at=6)
    assert os.path.exists(os.path.join(out, STEP_CHECKPOINT)) and not os.path.exists(os.path.join(out, CHECKPOINT))
    # stopped again at step 8 of epoch 2 (after the step-6 checkpoint; epoch 1's own is kept)
    with pytest.raises(Stop):
        _train(out, workers, stop_at=STEPS - 3 + 8)
    state, resumed_history, lines = _train(out, workers)
    assert "train: resuming at step 6/10 of epoch 2/2" in lines, lines
    _same(state, whole)
    strip = ("train_images_per_s", "train_epoch_s")  # timings differ; every sum is restored
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed_history] == \
        [{k: v for k, v in e.items() if k not in strip} for e in history]
    assert not os.path.exists(os.path.join(out, STEP_CHECKPOINT))  # removed once its epoch ended


def test_a_step_checkpoint_of_another_world_size_restarts_the_epoch(tmp_path):
    """Each rank's streams are in the file: resumed by fewer or more processes, the epoch starts
    over from its own checkpoint, as without checkpoint_every (said in the log)."""
    from vitfast.engine.checkpoint import read_training_meta, save_training_state

    out = str(tmp_path / "run")
    with pytest.raises(Stop):
        _train(out, stop_at=STEPS + 8)
    path = os.path.join(out, STEP_CHECKPOINT)
    meta = read_training_meta(path)
    assert meta["epoch"] == 1 and meta["extra"]["step"] == 6 and len(meta["extra"]["ranks"]) == 1
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.GELU(), nn.Linear(16, 3))
    save_training_state(path, model=model, epoch=1, extra={**meta["extra"], "ranks": meta["extra"]["ranks"] * 2})
    whole, _, _ = _train(str(tmp_path / "whole"))
    state, _, lines = _train(out)
    assert any("was written by 2 process(es), this run has 1: epoch 2 restarts from its beginning" in x
               for x in lines), lines
    _same(state, whole)


def _ddp_worker(rank, world, init, out, stop_at, results):
    import torch.distributed as dist

    os.environ["RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        state, _, lines = _train(out, stop_at=stop_at if rank == 1 else None, rank=rank, world=world)
        results.put((rank, ({k: v.numpy().copy() for k, v in state.items()}, lines)))  # not via shared memory
    except Stop:
        results.put((rank, "stopped"))
        results.close()
        results.join_thread()  # the message is out before the process is
        os._exit(0)  # a killed rank: the others are stopped by their next collective's failure
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _ddp(tmp_path, name, out, stop_at=None, expect=2, worker=None):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp_path / name}"
    procs = [ctx.Process(target=worker or _ddp_worker, args=(r, 2, init, out, stop_at, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    import queue

    try:
        for _ in range(expect):  # a rank that fails (its peer stopped) puts nothing
            rank, value = results.get(timeout=120)
            if isinstance(value, tuple):
                value = ({k: torch.from_numpy(v) for k, v in value[0].items()}, value[1])
            got[rank] = value
    except queue.Empty:
        pass
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    return got


@pytest.mark.slow
def test_ddp_ranks_resume_within_an_epoch_exactly(tmp_path):
    """Two gloo processes, each with its own dropout and augmentation streams (seeded per rank):
    stopped within epoch 2 and resumed, both end with the uninterrupted run's weights."""
    whole = _ddp(tmp_path, "init_whole", str(tmp_path / "whole"))
    assert set(whole) == {0, 1}
    _same(whole[0][0], whole[1][0])
    out = str(tmp_path / "stopped")
    stopped = _ddp(tmp_path, "init_stop", out, stop_at=STEPS + 8, expect=1)  # rank 1 at step 8 of epoch 2
    assert stopped == {1: "stopped"}
    from vitfast.engine.checkpoint import read_training_meta

    meta_step = read_training_meta(os.path.join(out, STEP_CHECKPOINT))
    assert meta_step["extra"]["step"] == 6 and len(meta_step["extra"]["ranks"]) == 2
    resumed = _ddp(tmp_path, "init_resume", out)
    assert set(resumed) == {0, 1}
    assert "train: resuming at step 6/10 of epoch 2/2" in resumed[0][1], resumed[0][1]
    _same(resumed[0][0], whole[0][0])
    _same(resumed[1][0], whole[0][0])
