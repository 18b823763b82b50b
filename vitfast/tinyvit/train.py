"""TinyViT fast pretraining distillation: run the teacher once (save_logits), then train any
number of students from the store (distill) with the fused sparse soft-target loss."""
from __future__ import annotations

import math
import os
import time

import torch
from torch import nn

from .. import distributed as vdist
from ..data.identity import data_identity
from ..engine import sigterm
from ..ops import sparse_soft_target_cross_entropy, topk_softmax
from ..progress import progress as progress_bar
from .replay import PairDataset, ReplayAugment, collate_pairs, epoch_plan, rank_slice
from .store import (LogitStore, ResumePoint, ShardWriter, StoreError, StoreMeta, check_store_data, epoch_state,
                    read_meta, remove_stale_shards, shard_complete, write_meta)


class StoreCollate:
    """collate_pairs, plus the store's records for the batch's keys: (keys, seeds, canonical,
    images, soft labels, values (n, k), indices (n, k)). The lookup runs in the data-loader
    worker, so the training loop gets pinned tensors and never waits on the store."""

    def __init__(self, store: LogitStore | None = None, epoch: int = 0):
        self.store, self.epoch = store, epoch

    def __call__(self, items):
        kb, sb, cb, xb, tb = collate_pairs(items)
        if self.store is None:
            return kb, sb, cb, xb, tb, torch.zeros(len(kb), 0), torch.zeros(len(kb), 0, dtype=torch.int64)
        seeds, values, indices = self.store.lookup(self.epoch, kb.numpy())
        if not torch.equal(seeds, sb):
            raise StoreError(f"store '{self.store.root}' epoch {self.epoch}: stored augmentation seeds differ from the "
                             "replay (was it written with another seed or data set?)")
        return kb, sb, cb, xb, tb, values, indices


def _loader(augment, plan, epoch, base_seed, batch_pairs, workers, num_classes=None, store=None):
    ds = PairDataset(augment, *plan, epoch=epoch, base_seed=base_seed, num_classes=num_classes)
    return torch.utils.data.DataLoader(ds, batch_size=batch_pairs, num_workers=workers,
                                       collate_fn=StoreCollate(store, epoch), persistent_workers=False,
                                       pin_memory=torch.cuda.is_available(), worker_init_fn=sigterm.worker_init)


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """Asynchronous device-to-host copy (pinned destination); valid after the stream syncs."""
    if t.device.type != "cuda":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


@torch.no_grad()
def save_logits(teacher: nn.Module, dataset, transform, root: str, epochs, k: int = 100, encoding: str = "exact",
                batch_size: int = 256, base_seed: int = 0, mixup_args: dict | None = None, teacher_name: str = "",
                device="cpu", workers: int = 0, progress: bool = True, log=print, recipe: dict | None = None,
                checkpoint_seconds: float = 60.0) -> list[str]:
    """Write one shard per (epoch, rank) for `epochs` (an iterable: epochs can be split across jobs).
    Complete shards are skipped, and a shard in progress is checkpointed every `checkpoint_seconds`
    and when the run stops (SIGTERM, Ctrl-C, an error), so a stopped or killed run resumes at the
    batch it had saved. SIGTERM (engine.sigterm) stops at the next batch: each rank saves its own
    shard's progress (no agreement needed: shards are per rank) and raises sigterm.Terminated."""
    rank, world = vdist.rank_world()
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    num_classes = teacher.num_classes if hasattr(teacher, "num_classes") else None
    if num_classes is None:
        raise ValueError("save_logits: the teacher must expose num_classes")
    from ..errors import UserError
    from ..ops._checks import TOPK_MAX_K

    if not 1 <= k <= min(num_classes, TOPK_MAX_K):  # before store.json exists: a failed start leaves nothing
        raise UserError(f"argument --topk must lie in [1, min(classes, {TOPK_MAX_K})] = [1, "
                        f"{min(num_classes, TOPK_MAX_K)}], got {k}")
    meta = StoreMeta(k=k, num_classes=int(num_classes), encoding=encoding, teacher=teacher_name,
                     dataset_size=len(dataset), seed=base_seed, data=data_identity(dataset),
                     augmentation={"transform": repr(transform), "mixup": mixup_args,
                                   **({"recipe": recipe} if recipe is not None else {})})
    if rank == 0:
        write_meta(root, meta)
    vdist.barrier()
    meta = read_meta(root)
    augment = ReplayAugment(dataset, transform, mixup_args)
    amp = device.type == "cuda"
    written = []
    epochs = list(epochs)
    with sigterm.deferred(after="after the last shard was written"):
        for epoch in epochs:
            written += _save_epoch(teacher, augment, root, meta, epoch, k, batch_size, base_seed, device, amp,
                                   workers, progress, log, checkpoint_seconds)
    vdist.barrier()
    if rank == 0:  # what this run was asked for is complete, or it says which part is not
        LogitStore(root, verify=False).require_complete(epochs)
    return written


def _save_epoch(teacher, augment, root, meta, epoch, k, batch_size, base_seed, device, amp, workers, progress, log,
                checkpoint_seconds) -> list[str]:
    """This rank's shard of `epoch` (nothing when it is there already), resumed where a stopped
    writer saved it."""
    rank, world = vdist.rank_world()
    vdist.barrier()  # every rank judges the epoch before any rank changes it
    state = epoch_state(root, meta, epoch)
    if state.complete:
        log(f"save-logits: epoch {epoch} already complete, skipped")
        if rank == 0:  # what writers of a larger run left (finished before this cleanup existed)
            for name in remove_stale_shards(root, meta, epoch, state.shards[0][1], finished=False):
                log(f"save-logits: epoch {epoch}: removed {name} of an earlier run with more ranks")
        return []
    vdist.barrier()
    if rank == 0:  # a run of another world size left shards and .tmp files this run will not overwrite
        for name in remove_stale_shards(root, meta, epoch, world):
            log(f"save-logits: epoch {epoch}: removed {name} of an earlier run with more ranks")
    if shard_complete(root, meta, epoch, rank, world):
        log(f"save-logits: epoch {epoch} rank {rank} already written, skipped")
        return []
    if sigterm.requested():  # came between epochs: nothing of this one is written yet
        sigterm.stopped()
        raise sigterm.Terminated(f"epoch {epoch} rank {rank} not started; the same command resumes there")
    pairs, canonical = rank_slice(epoch_plan(len(augment.dataset), epoch, base_seed, world), rank, world)
    bp = max(1, batch_size // 2)

    def keys_of(b):  # the stored samples of the first b batches, in the order they were written
        return pairs[:b * bp].reshape(-1)[canonical[:b * bp].reshape(-1)]

    resume = ResumePoint({"world": world, "batch_pairs": bp, "seed": base_seed, "pairs": len(pairs)}, keys_of)
    writer = ShardWriter(root, meta, epoch, rank, world, asynchronous=True, resume=resume,
                         checkpoint_seconds=checkpoint_seconds)
    start, total = writer.batches, math.ceil(len(pairs) / bp)
    if start:
        log(f"save-logits: epoch {epoch} rank {rank}: resuming after batch {start}/{total} "
            f"({writer.records} records saved)")
    count, t0 = 0, time.time()
    pending = None  # the previous batch, handed to the writer once the next one is queued

    def hand_over(batch):
        kb, sb, keep, v, i, done = batch
        if done is not None:
            done.synchronize()
        # encoding and disk writes happen on the writer's thread
        writer.add(kb[keep], sb[keep], v.numpy()[keep], i.numpy()[keep])
        return int(keep.sum())

    try:
        batches = _Waited(_loader(augment, (pairs[start * bp:], canonical[start * bp:]), epoch, base_seed, bp,
                                  workers))
        for kb, sb, cb, xb, *_ in progress_bar(batches, desc=f"save-logits epoch {epoch}",
                                               enabled=progress and rank == 0, leave=False,
                                               initial=start, total=total):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = teacher(xb.to(device, non_blocking=True))
            v, i = topk_softmax(logits, k)  # fused kernel on the teacher's own (bf16) logits
            v, i = _pinned_copy(v.float()), _pinned_copy(i)
            done = None
            if device.type == "cuda":
                done = torch.cuda.Event()
                done.record()
            # the GPU runs this batch while the host waits for the previous one's results
            if pending is not None:
                count += hand_over(pending)
            pending = (kb.numpy(), sb.numpy(), cb.numpy(), v, i, done)
            if sigterm.requested():  # this rank stops here; its shard's progress is saved below
                count += hand_over(pending)
                pending = None
                writer.suspend()
                sigterm.stopped()
                raise sigterm.Terminated(f"epoch {epoch} rank {rank}: {writer.records} of {len(keys_of(total))} "
                                         "records saved; the same command resumes there")
        if pending is not None:
            count += hand_over(pending)
    except BaseException:
        writer.suspend()  # what was handed over stays for the resumed run
        raise
    written = [writer.close()]
    took = time.time() - t0
    # where the time went: blocked on the data path (augmentation, in the workers) or not (the
    # teacher, top-k, the hand-over); the larger part is what to scale (--workers vs the teacher)
    log(f"save-logits: epoch {epoch} rank {rank}: {count} records in {took:.1f}s ({count / max(took, 1e-9):.0f} "
        f"img/s; waiting for data {batches.waited:.1f}s = {100 * batches.waited / max(took, 1e-9):.0f}%, "
        f"{'data' if batches.waited > took / 2 else 'teacher'}-bound)")
    return written


class _Waited:
    """An iterable's items, with the time spent waiting for them summed in `waited`."""

    def __init__(self, iterable):
        self.iterable, self.waited = iterable, 0.0

    def __len__(self):
        return len(self.iterable)

    def __iter__(self):
        it = sigterm.iterate(self.iterable)  # workers started with SIGTERM blocked: they outlive a scheduler's
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.waited += time.perf_counter() - t
                return
            self.waited += time.perf_counter() - t
            yield item


class StoreReplay:
    """A store's training data, replayed: `replay(epoch)` is this rank's loader of (keys, seeds,
    canonical, images, soft labels, values (n, k), indices (n, k)), the images augmented exactly as
    when the teacher saw them. Student epoch e replays store epoch e mod (epochs stored). With
    root=None, the same replay without a store (labels only, seeded by base_seed / mixup_args).
    Every check runs here, before training: complete epochs, the data set's size, the
    augmentation the store was written with."""

    def __init__(self, root: str | None, dataset, transform, batch_size: int, workers: int = 0, base_seed: int = 0,
                 mixup_args: dict | None = None, num_classes: int | None = None):
        self.rank, self.world = vdist.rank_world()
        self.store, self.root = None, root
        self.seed, self.mix, self.stored = base_seed, mixup_args, None
        if root is not None:
            meta = read_meta(root)
            self.meta, self.store = meta, LogitStore(root)
            self.seed, self.mix = meta.seed, (meta.augmentation or {}).get("mixup")
            stored = self.store.epochs()
            if stored != list(range(len(stored))) or not stored:
                raise StoreError(f"store '{root}' must hold epochs 0..N-1 without gaps, it holds {stored[:10]}")
            self.store.require_complete(stored)  # an incomplete epoch is named, never skipped or cycled
            self.stored = len(stored)
            if len(dataset) != meta.dataset_size:
                raise StoreError(f"store '{root}' was written for {meta.dataset_size} samples, the data set has "
                                 f"{len(dataset)}")
            check_store_data(root, meta, dataset)
            written, here = (meta.augmentation or {}).get("transform"), repr(transform)
            comparable = written is not None and " at 0x" not in written + here  # reprs with addresses vary
            if comparable and written != here:
                raise StoreError(f"store '{root}' was written with another augmentation than this replay's "
                                 f"(stored: {written[:200]}...; here: {here[:200]}...)")
        self.dataset, self.workers, self.num_classes = dataset, workers, num_classes
        self.batch_pairs = max(1, batch_size // 2)
        pairs_per_rank = len(epoch_plan(len(dataset), 0, self.seed, self.world)[0]) // self.world
        self.steps_per_epoch = math.ceil(pairs_per_rank / self.batch_pairs)
        self.augment = ReplayAugment(dataset, transform, self.mix)

    def check_classes(self, student: nn.Module) -> None:
        classes = getattr(student, "num_classes", self.meta.num_classes)
        if classes != self.meta.num_classes:
            raise StoreError(f"store '{self.root}' holds {self.meta.num_classes}-class soft labels, the student has "
                             f"{classes} classes")

    def __call__(self, epoch: int, start: int = 0):
        """This rank's loader of `epoch`, from its start-th batch on (every pair is augmented under
        its own seeds: a resumed epoch loads nothing before it)."""
        replay = epoch if self.store is None else epoch % self.stored
        pairs, canonical = rank_slice(epoch_plan(len(self.dataset), replay, self.seed, self.world), self.rank,
                                      self.world)
        plan = pairs[start * self.batch_pairs:], canonical[start * self.batch_pairs:]
        if self.store is not None:
            self.store.keys(replay)  # open and verify this epoch's shards once, before the workers start
        return _loader(self.augment, plan, replay, self.seed, self.batch_pairs, self.workers, self.num_classes,
                       self.store)


@torch.no_grad()
def evaluate(model, images, labels, batch_size=256, device="cpu") -> float:
    from ..engine.evaluation import evaluate as engine_evaluate, tensor_batches

    return engine_evaluate(model, tensor_batches(images, labels, batch_size), device)["top1"]


def _accuracy(model, eval_set, device) -> float:
    """Top-1 on (images, labels) tensors or on a batches factory (a streamed folder)."""
    if callable(eval_set):
        from ..engine.evaluation import evaluate as engine_evaluate

        return engine_evaluate(model, eval_set(), device)["top1"]
    return evaluate(model, *eval_set, device=device)


def distill(student: nn.Module, dataset, transform, root: str | None, epochs: int, lr: float = 1e-3,
            weight_decay: float = 0.05, batch_size: int = 128, warmup_epochs: int = 1, clip_grad: float | None = 5.0,
            ema_decay: float | None = None, device="cpu", workers: int = 0, checkpoint_dir: str | None = None,
            eval_set=None, labels_only: bool = False, base_seed: int = 0, mixup_args: dict | None = None,
            progress: bool = True, log=print, amp_dtype: str = "bfloat16", compile: bool = False,
            checkpoint_every: int = 0) -> dict:
    """Train `student` from the store at `root` (no teacher in the loop): sparse soft-target CE on
    the replayed images. Student epoch e replays store epoch e mod (epochs stored), so a store can
    serve longer schedules. labels_only=True trains the same student on ground-truth labels
    instead (mixed by the same Mixup: the no-teacher baseline). The training machinery (schedule,
    AMP, clipping, EMA, DDP, one atomic checkpoint per epoch in checkpoint_dir, resume) is
    vitfast.engine.fit. Returns {history, eval_accuracy}; the final weights are also written to
    checkpoint_dir/student.safetensors."""
    from ..engine import TrainConfig, fit

    device = torch.device(device)
    replay = StoreReplay(None if labels_only else root, dataset, transform, batch_size, workers, base_seed, mixup_args,
                         num_classes=student.num_classes if labels_only else None)
    if not labels_only:
        replay.check_classes(student)
    student = student.to(device)
    steps_per_epoch, batches, rank = replay.steps_per_epoch, replay, replay.rank

    def loss_fn(model, batch):
        kb, sb, cb, xb, tb, vb, ib = batch
        if not bool(cb.all()):  # padding pairs of the last batch; otherwise the pinned batch as is
            keep = cb.bool()
            xb, kb, tb, vb, ib = xb[keep], kb[keep], tb[keep], vb[keep], ib[keep]
        logits = model(xb.to(device, non_blocking=True))
        if labels_only:
            loss = -(tb.to(device, non_blocking=True) * torch.log_softmax(logits.float(), -1)).sum(-1).mean()
        else:
            loss = sparse_soft_target_cross_entropy(logits, vb.to(device, non_blocking=True),
                                                    ib.to(device, non_blocking=True))
        return loss, len(kb), {}

    def evaluate_epoch(model, ema, epoch):
        if eval_set is None:
            return None
        out = {"accuracy": _accuracy(model, eval_set, device)}
        if ema is not None:
            out["accuracy_ema"] = _accuracy(ema, eval_set, device)
        return out

    cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, clip_grad=clip_grad,
                      ema_decay=ema_decay, amp_dtype=amp_dtype, compile=compile, seed=base_seed,
                      checkpoint_every=checkpoint_every)
    res = fit(student, cfg, batches=batches, steps_per_epoch=steps_per_epoch, loss_fn=loss_fn, device=device,
              out_dir=checkpoint_dir, evaluate=evaluate_epoch, log=log, progress=progress, desc="distill")
    if checkpoint_dir and rank == 0:
        from safetensors.torch import save_file

        from ..engine.checkpoint import atomic_write, state_tensors

        final = res.ema if res.ema is not None else student
        atomic_write(os.path.join(checkpoint_dir, "student.safetensors"),
                     lambda tmp: save_file(state_tensors(final), tmp))
    vdist.barrier()
    result = {"history": res.history}
    if eval_set is not None:
        result["eval_accuracy"] = _accuracy(student, eval_set, device)
    return result
