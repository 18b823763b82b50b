"""The training loop every vitfast pipeline uses: timm's AdamW (no decay on norms and biases) and
warm-up + cosine schedule (per update), autocast (bf16 / fp16 with a GradScaler), gradient
clipping with the gradient norm recorded, timm's EMA, DDP under torchrun, loss and metric sums
kept on the device (one host sync per epoch), one atomic checkpoint file per epoch with exact
resume, evaluation each epoch, progress bars, a log file and timm's summary.csv.

A pipeline supplies only what is its own: the batches of an epoch and the loss of a batch."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .. import distributed as vdist
from ..errors import UserError
from ..progress import progress as progress_bar
from . import folder_lock, sigterm
from .checkpoint import load_training_state, read_training_meta, save_training_state

CHECKPOINT = "checkpoint.safetensors"
STEP_CHECKPOINT = "checkpoint_step.safetensors"  # within an epoch (TrainConfig.checkpoint_every)
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


@dataclass
class TrainConfig:
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    clip_grad: float | None = 5.0
    ema_decay: float | None = None
    amp_dtype: str = "bfloat16"  # on CUDA; "float32" turns autocast off (CPU runs float32 always)
    compile: bool = False  # torch.compile the model for the training steps
    opt: str = "adamw"
    seed: int = 0
    checkpoint_every: int = 0  # steps; also checkpoint within an epoch (0: at epoch ends only)

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError(f"argument --epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"argument --lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"argument --weight-decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or self.warmup_epochs >= self.epochs + 1:
            raise UserError(f"argument --warmup-epochs must lie in [0, epochs], got {self.warmup_epochs}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise UserError(f"argument --clip-grad must be > 0 (or omitted), got {self.clip_grad}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise UserError(f"argument --ema must lie in (0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 0:
            raise UserError(f"argument --checkpoint-every must be >= 0 (steps; 0: at epoch ends only), got "
                            f"{self.checkpoint_every}")
        if self.amp_dtype not in AMP_DTYPES:
            raise UserError(f"argument --amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {self.amp_dtype!r}")


class RunLog:
    """print + a log file (rank 0), and timm's summary.csv with one row per epoch."""

    def __init__(self, out_dir: str | None, enabled: bool = True, name: str = "log.txt", echo: bool = True):
        self.out_dir, self.enabled, self.echo = out_dir, enabled, echo
        self.path = os.path.join(out_dir, name) if out_dir and enabled else None  # made at the first line:
        # a run refused before it logged anything leaves no folder behind

    def __call__(self, *parts) -> None:
        if not self.enabled:
            return
        msg = " ".join(str(p) for p in parts)
        if self.echo:
            print(msg, flush=True)
        if self.path:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def summary(self, epoch: int, train: dict, evaluation: dict | None, lr: float) -> None:
        if not (self.enabled and self.out_dir):
            return
        from timm.utils import update_summary

        path = os.path.join(self.out_dir, "summary.csv")
        update_summary(epoch, train, evaluation or {}, path, lr=lr, write_header=not os.path.exists(path))


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """torch, NumPy (timm's Mixup) and random, seeded from (seed, epoch, rank)."""
    import random

    import numpy as np

    s = (seed * 1000003 + epoch * 9973 + rank) % 2**31
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def rng_state(device: torch.device) -> dict:
    """This process's random streams (torch, CUDA, NumPy, random) as JSON-able values."""
    import base64
    import random

    import numpy as np

    def b64(t):
        return base64.b64encode(t.numpy().tobytes()).decode()

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out = {"torch": b64(torch.get_rng_state()), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
           "random": [version, list(internal), gauss_next]}
    if device.type == "cuda":
        out["cuda"] = b64(torch.cuda.get_rng_state(device))
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    import base64
    import random

    import numpy as np

    def tensor(text):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(tensor(state["cuda"]), device)


def amp_name(amp) -> str:
    """An autocast setting as a dtype name: True -> bfloat16 (the default), False / None -> float32."""
    if amp is True:
        return "bfloat16"
    if amp is False or amp is None:
        return "float32"
    if amp not in AMP_DTYPES:
        raise UserError(f"argument --amp-dtype must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    return amp


def autocast_for(device: torch.device, amp_dtype):
    """Autocast in `amp_dtype` (a name of AMP_DTYPES, or a bool: see amp_name) on CUDA; off elsewhere."""
    dtype = AMP_DTYPES[amp_name(amp_dtype)]
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=device.type == "cuda" and dtype is not None)


@folder_lock.holds_output("out_dir", "checkpoint folder")
def fit(model: nn.Module, cfg: TrainConfig, *, batches: Callable[[int], Iterable], steps_per_epoch: int,
        loss_fn: Callable[[nn.Module, object], tuple], device, out_dir: str | None = None,
        evaluate: Callable[[nn.Module, nn.Module | None, int], dict] | None = None, params=None,
        log: RunLog | Callable | None = None, progress: bool = True, desc: str = "train",
        on_resume: Callable[[dict], None] | None = None, extra_state: Callable[[], dict] | None = None) -> "FitResult":
    """Train `model` for cfg.epochs; returns the per-epoch history (also in summary.csv) and the
    EMA copy of the model when cfg.ema_decay is set.

    batches(epoch): the epoch's batches (a DataLoader, this rank's share under torchrun); or
        batches(epoch, start=0): from the epoch's start-th batch on, for a resume within an epoch
        that loads nothing twice (right only when each sample's augmentation draws from a seed of
        its own, as engine.data.epoch_loader's; without `start` the first batches are drawn again).
    loss_fn(model, batch) -> (loss, samples, metrics): a scalar loss to minimise, the number of
        samples it covers, and a dict of scalar tensors to average (e.g. its parts).
    evaluate(model, ema_model, epoch) -> dict of numbers (rank 0), or None.
    With out_dir, the state after each epoch is one atomic checkpoint file there, and a later call
    resumes after its epoch (the caller checks that the run is the same: engine.run.RunDir).
    cfg.checkpoint_every = N also saves after every N steps within an epoch (a second file, so the
    epoch's own checkpoint stays): a later call with as many processes resumes at that step,
    exactly -- it starts the loader at that batch (batches with `start`) or draws the epoch's
    first batches again without training on them (the data pipeline and its workers' random
    streams as they were), and restores every rank's random streams and running sums.
    SIGTERM (a scheduler's stop: engine.sigterm) with out_dir: the step in progress finishes, all
    ranks save at the same step (under torchrun the next one: the vote is pipelined) in the step
    file, whatever checkpoint_every is, and fit raises sigterm.Terminated, a KeyboardInterrupt; a
    later call resumes at that step. A DataLoader that
    batches returns gets sigterm.worker_init before its own worker_init_fn, and its workers start
    with SIGTERM blocked (sigterm.iterate), so that they, which a scheduler signals too, keep
    serving until the save (unless the program has a SIGTERM handler of its own: then neither).
    out_dir is locked while fit runs (engine.folder_lock): a second process is refused, naming it."""
    cfg.validate()
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    rank, world = vdist.rank_world()
    log = log or RunLog(None, rank == 0)
    device = torch.device(device)
    model.to(device)
    opt = create_optimizer_v2(params if params is not None else model, cfg.opt, lr=cfg.lr,
                              weight_decay=cfg.weight_decay)
    updates = cfg.epochs * steps_per_epoch
    sched = CosineLRScheduler(opt, t_initial=updates, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs * steps_per_epoch),
                              warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
    amp = autocast_for(device, cfg.amp_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and cfg.amp_dtype == "float16")
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay)
    ckpt = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    step_ckpt = os.path.join(out_dir, STEP_CHECKPOINT) if out_dir else None
    start, history, within = 0, [], None
    state = dict(model=model, optimizer=opt, scheduler=sched, ema=ema.module if ema is not None else None,
                 scaler=scaler, device=device)
    if ckpt and os.path.exists(ckpt):
        meta = load_training_state(ckpt, **state)
        start, history = meta["epoch"], meta["extra"].get("history", [])
        if on_resume is not None:
            on_resume(meta["extra"])
        log(f"{desc}: resuming after epoch {start}/{cfg.epochs}")
    if step_ckpt and os.path.exists(step_ckpt):
        saved = read_training_meta(step_ckpt)
        ranks = saved["extra"].get("ranks", [])
        if saved["epoch"] != start:  # left by an epoch that ended since (its removal did not happen)
            log(f"{desc}: ignoring {STEP_CHECKPOINT} of epoch {saved['epoch'] + 1} (the run is past it)")
        elif len(ranks) != world:
            log(f"{desc}: {STEP_CHECKPOINT} was written by {len(ranks)} process(es), this run has {world}: epoch "
                f"{start + 1} restarts from its beginning")
        elif start < cfg.epochs:
            meta = load_training_state(step_ckpt, **state)
            history = meta["extra"].get("history", [])
            if on_resume is not None:
                on_resume(meta["extra"])
            within = {"step": meta["extra"]["step"], **ranks[rank]}
            log(f"{desc}: resuming at step {within['step']}/{steps_per_epoch} of epoch {start + 1}/{cfg.epochs}")
    wrapped = model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # the steps run compiled; checkpoints, EMA and evaluation use `model` (same parameters)
        wrapped = torch.compile(wrapped)
    train_params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    starts_at = _takes_start(batches)
    # SIGTERM (a scheduler's stop) with somewhere to save: the step in progress finishes, every rank
    # saves at the same step and fit raises sigterm.Terminated; elsewhere it stops at once (sigterm)
    with sigterm.deferred(active=out_dir is not None):
        group = sigterm.cpu_group() if out_dir is not None and world > 1 else None
        vote = sigterm.StopVote(world, group) if out_dir is not None else None

        def save_step():  # the state within the epoch, after `steps` steps
            mine = {"rng": rng_state(device), "count": count, "loss_sum": loss_sum.item(),
                    "gnorm_sum": gnorm_sum.item(), "gnorm_max": gnorm_max.item(),
                    "sums": {k: v.item() for k, v in sums.items()}, "elapsed": time.time() - t0}
            ranks = vdist.all_gather_objects(mine)  # each rank's streams: all resume exactly
            if rank == 0:
                save_training_state(step_ckpt, epoch=epoch, extra={
                    "history": history, "step": steps, "ranks": ranks, **(extra_state() if extra_state else {})},
                    **{k: v for k, v in state.items() if k != "device"})

        for epoch in range(start, cfg.epochs):
            seed_epoch(cfg.seed, epoch, rank)  # an epoch's randomness depends on (seed, epoch, rank) only: exact resume
            wrapped.train()
            sums: dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), device=device)
            gnorm_sum = torch.zeros((), device=device)
            gnorm_max = torch.zeros((), device=device)
            count, steps, t0 = 0, 0, time.time()
            # resuming within this epoch: from its next batch on
            loader = batches(epoch, start=within["step"]) if within is not None and starts_at else batches(epoch)
            # workers (of a loader of the caller's own too) keep serving until the save
            source = sigterm.iterate(loader) if out_dir is not None else iter(loader)
            if within is not None:
                for _ in range(0 if starts_at else within["step"]):  # its first batches again, untrained
                    if next(source, None) is None:
                        raise UserError(f"{desc}: {STEP_CHECKPOINT} is at step {within['step']} of epoch {epoch + 1}, "
                                        "but the epoch now has fewer batches; delete it to restart the epoch")
                set_rng_state(within["rng"], device)
                steps, count = within["step"], within["count"]
                loss_sum.fill_(within["loss_sum"])
                gnorm_sum.fill_(within["gnorm_sum"])
                gnorm_max.fill_(within["gnorm_max"])
                sums = {k: torch.zeros((), device=device).fill_(v) for k, v in within["sums"].items()}
                t0 = time.time() - within["elapsed"]
                within = None
            # progress() takes one iterator: a second DataLoader iterator would start a second set of
            # workers and, drawing its seeds after the first's, make the epoch's order depend on --workers
            for batch in progress_bar(source, total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                                      enabled=progress and rank == 0, leave=False, initial=steps):
                with amp:
                    loss, n, metrics = loss_fn(wrapped, batch)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(train_params, cfg.clip_grad if cfg.clip_grad else float("inf"))
                scaler.step(opt)
                scaler.update()
                sched.step_update(epoch * steps_per_epoch + steps + 1)
                if ema is not None:
                    ema.update(model)
                loss_sum += loss.detach().float() * n
                for k, v in metrics.items():
                    sums[k] = sums.get(k, torch.zeros((), device=device)) + v.detach().float() * n
                gnorm = gnorm.detach().float()
                gnorm_sum += gnorm
                gnorm_max = torch.maximum(gnorm_max, gnorm)
                count += int(n)
                steps += 1
                stop = vote is not None and vote.after_step()
                if stop or step_ckpt and cfg.checkpoint_every and steps % cfg.checkpoint_every == 0 \
                        and steps < steps_per_epoch:
                    save_step()
                if stop:  # the last step included: the epoch's end (evaluation) runs on resume
                    _stop_saved(log, steps, steps_per_epoch, epoch, cfg.epochs, desc)
            if vote is not None and steps and vote.settle():  # the vote of the epoch's last step
                save_step()
                _stop_saved(log, steps, steps_per_epoch, epoch, cfg.epochs, desc)
            if steps == 0:
                raise UserError(f"{desc}: epoch {epoch + 1} had no batches (is the data set smaller than the batch "
                                "size?)")
            # one sync per epoch; under torchrun the sums are averaged over ranks
            packed = torch.stack([loss_sum, torch.tensor(float(count), device=device), gnorm_sum,
                                  torch.tensor(float(steps), device=device)] + [sums[k] for k in sorted(sums)])
            if world > 1:
                torch.distributed.all_reduce(packed)
            vals = packed.tolist()
            total = max(vals[1], 1.0)
            train = {"loss": vals[0] / total, "grad_norm": vals[2] / max(vals[3], 1.0),
                     "grad_norm_max": gnorm_max.item(), "images_per_s": vals[1] / max(time.time() - t0, 1e-9),
                     "epoch_s": time.time() - t0}
            train.update({k: v / total for k, v in zip(sorted(sums), vals[4:])})
            lr = opt.param_groups[0]["lr"]
            evaluation = (evaluate(model, ema.module if ema is not None else None, epoch)
                          if evaluate and rank == 0 else None)
            entry = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v for k, v in train.items()},
                     **{f"eval_{k}": v for k, v in (evaluation or {}).items()}}
            history.append(entry)
            log(f"{desc}: epoch {epoch + 1}/{cfg.epochs} " + ", ".join(
                f"{k} {v:.4g}" for k, v in entry.items() if k not in ("epoch",)))
            if hasattr(log, "summary"):  # a RunLog; plain callables (print) just get the lines
                log.summary(epoch + 1, train, evaluation, lr)
            if ckpt and rank == 0:
                save_training_state(ckpt, epoch=epoch + 1, **{k: v for k, v in state.items() if k != "device"},
                                    extra={"history": history, **(extra_state() if extra_state else {})})
                if os.path.exists(step_ckpt):  # the epoch is whole: its within-epoch state is stale
                    os.remove(step_ckpt)
            vdist.barrier()
            if out_dir is not None and sigterm.stop_agreed(world, group):  # (it came during the evaluation, say)
                _stop(log, f"saved after epoch {epoch + 1}/{cfg.epochs}", desc)
    model.eval()
    return FitResult(history, ema.module.eval() if ema is not None else None)


def _takes_start(batches) -> bool:
    """Whether batches(epoch, start=k) gives an epoch from its k-th batch on (the pipelines' loaders,
    whose samples each draw from a seed of their own), so that a resumed epoch loads nothing twice."""
    import inspect

    try:
        return "start" in inspect.signature(batches).parameters
    except (TypeError, ValueError):  # a callable without a signature (a builtin): replay
        return False


def _stop_saved(log, steps: int, steps_per_epoch: int, epoch: int, epochs: int, desc: str) -> None:
    vdist.barrier()  # nobody leaves before the step file is whole (torchrun ends all when one exits)
    _stop(log, f"saved at step {steps}/{steps_per_epoch} of epoch {epoch + 1}/{epochs}", desc)


def _stop(log, where: str, desc: str) -> None:
    log(f"{desc}: stopped by SIGTERM, {where}; the same command resumes there")
    sigterm.stopped()
    raise sigterm.Terminated(where)


@dataclass
class FitResult:
    history: list
    ema: nn.Module | None = None
