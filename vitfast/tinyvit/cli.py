"""`vitfast tinyvit save-logits | distill | inspect | verify`."""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def _epochs(spec: str) -> list[int]:
    """'10' -> 0..9; '3:7' -> 3..6 (epochs can be split across jobs)."""
    from ..errors import UserError

    try:
        a, b = (int(v) for v in spec.split(":")) if ":" in spec else (0, int(spec))
    except ValueError as exc:
        raise UserError(f"argument --epochs must be N or A:B (epochs A..B-1), got {spec!r}") from exc
    if not 0 <= a < b:
        raise UserError(f"argument --epochs must name at least one epoch (N >= 1, or A:B with 0 <= A < B), got {spec!r}")
    return list(range(a, b))


def add_parser(sub) -> None:
    p = sub.add_parser("tinyvit", help="TinyViT fast distillation: save-logits, distill, inspect, verify")
    tsub = p.add_subparsers(dest="tinyvit_command", required=True)
    d = "cuda" if torch.cuda.is_available() else "cpu"

    s = tsub.add_parser("save-logits", help="run the teacher once, store top-k + augmentation seeds",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--teacher", help="timm model name (default: the embedded digits teacher)")
    s.add_argument("--checkpoint")
    s.add_argument("--num-classes", type=int, help="classes of the teacher's head, if not its default")
    s.add_argument("--data", help="ImageFolder training directory (default: embedded digits)")
    s.add_argument("--epochs", default="30", help="N (epochs 0..N-1) or A:B")
    s.add_argument("--topk", type=int, default=None, help="default 100, or 5 on the 10-class default")
    s.add_argument("--encoding", choices=["exact", "compact"], default="exact")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=d)
    s.add_argument("--out", required=True, help="store directory")
    s.set_defaults(func=run_save)

    t = tsub.add_parser("distill", help="train a student from a store (no teacher in the loop)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--student", help="timm model name, e.g. tiny_vit_5m_224 (default: embedded digits student)")
    t.add_argument("--store", help="logit store (omit with --labels-only)")
    t.add_argument("--data", help="ImageFolder training directory (default: embedded digits)")
    t.add_argument("--eval-data", help="ImageFolder directory for accuracy each epoch")
    t.add_argument("--labels-only", action="store_true", help="baseline: same student on ground-truth labels")
    t.add_argument("--no-patch", action="store_true",
                   help="keep timm's attention (by default vitfast.patch fuses Swin/TinyViT window attention)")
    t.add_argument("--epochs", type=int, default=60, help="may exceed the store's epochs: they are cycled")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--warmup-epochs", type=int, default=1)
    t.add_argument("--clip-grad", type=float, default=5.0)
    t.add_argument("--ema", type=float, default=None, help="EMA decay, e.g. 0.999")
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=d)
    t.add_argument("--out", required=True, help="checkpoint directory (resumed if present)")
    t.set_defaults(func=run_distill)

    i = tsub.add_parser("inspect", help="summary of a store")
    i.add_argument("store")
    i.set_defaults(func=run_inspect)

    v = tsub.add_parser("verify", help="re-run the teacher on sampled keys and compare with the store")
    v.add_argument("store")
    v.add_argument("--teacher")
    v.add_argument("--checkpoint")
    v.add_argument("--num-classes", type=int)
    v.add_argument("--data")
    v.add_argument("--samples", type=int, default=64)
    v.add_argument("--epoch", type=int, default=0)
    v.add_argument("--device", default=d)
    v.set_defaults(func=run_verify)


def _data_and_transform(args, train: bool = True):
    """(dataset, transform, mixup args, eval set) for the embedded default or an ImageFolder."""
    if not getattr(args, "data", None):
        from .defaults import MIXUP, digits_train_set, digits_transform

        ds, eval_set = digits_train_set()
        return ds, digits_transform(), MIXUP, eval_set
    from timm.data import create_transform

    from ..data.augment import install_posterize_fix
    from ..data.folders import image_folder

    install_posterize_fix()
    ds = image_folder(args.data, what="--data")
    tf = create_transform(224, is_training=train, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                          interpolation="bicubic")
    mix = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5, "num_classes": len(ds.classes),
           "label_smoothing": 0.0}
    return ds, tf, mix, None


def _teacher(args):
    if not args.teacher:
        from ..models.digits_vit import load_digits_teacher

        return load_digits_teacher(), "vitfast_digits_vit"

    from ..engine.models import create_model
    from ..errors import UserError

    model = create_model(args.teacher, num_classes=getattr(args, "num_classes", None), checkpoint=args.checkpoint,
                         what="--teacher")
    if model.vitfast_weights == "random":
        raise UserError(f"argument --teacher {args.teacher}: no weights given (--checkpoint FILE); a random teacher "
                        "would fill the store with noise")
    return model.eval(), args.teacher


def run_save(args) -> int:
    from .. import distributed as vdist
    from ..errors import UserError
    from .train import save_logits

    epochs = _epochs(args.epochs)  # checked before the teacher is even loaded
    if args.batch_size < 2:
        raise UserError(f"argument --batch-size must be >= 2 (pairs of images), got {args.batch_size}")
    rank, world, device = vdist.setup(args.device)
    teacher, name = _teacher(args)
    ds, tf, mix, _ = _data_and_transform(args)
    k = args.topk if args.topk is not None else (5 if not args.data else 100)
    classes = len(ds.classes) if hasattr(ds, "classes") else 10  # the embedded digits have 10
    if getattr(teacher, "num_classes", classes) != classes:
        raise UserError(f"the teacher has {teacher.num_classes} classes, --data {classes}")
    save_logits(teacher, ds, tf, args.out, epochs, k, args.encoding, args.batch_size, args.seed, mix,
                name, device, args.workers, progress=rank == 0, log=print if rank == 0 else (lambda *_: None))
    vdist.cleanup()
    return 0


def run_distill(args) -> int:
    from .. import distributed as vdist
    from ..errors import UserError
    from .train import distill

    if args.epochs < 1:
        raise UserError(f"argument --epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 2:
        raise UserError(f"argument --batch-size must be >= 2 (pairs of images), got {args.batch_size}")
    if not args.labels_only and not args.store:
        raise UserError("--store is required (or --labels-only for the baseline)")
    from dataclasses import asdict

    from ..engine import RunDir, folder_digest
    from .store import read_meta

    # the output folder remembers its run: another configuration, store or data is refused
    store_id = asdict(read_meta(args.store)) if args.store and not args.labels_only else None
    RunDir(args.out, {k: v for k, v in vars(args).items() if k not in ("func", "device", "out", "workers")},
           {"store": store_id, "data": folder_digest(args.data), "eval_data": folder_digest(args.eval_data)}
           ).start(resume=True)
    rank, world, device = vdist.setup(args.device)
    ds, tf, mix, eval_set = _data_and_transform(args)
    torch.manual_seed(args.seed)  # the student's initial weights too: a run is reproducible
    if args.student:
        import timm

        classes = len(ds.classes) if hasattr(ds, "classes") else 10  # the embedded digits have 10
        student = timm.create_model(args.student, pretrained=False, num_classes=classes)
    else:
        from .defaults import digits_student

        student = digits_student()
    if not args.no_patch:
        from ..patching import patch, patched_modules

        patch(student)  # the fused window attention (tiny_vit_*, swin_*); other students are unchanged
        if patched_modules(student) and rank == 0:
            print(f"distill: fused window attention in {len(patched_modules(student))} modules")
    if args.eval_data:
        from ..data.folders import image_folder_tensors

        eval_set = image_folder_tensors(args.eval_data, 224)
    res = distill(student, ds, tf, args.store, args.epochs, args.lr, args.weight_decay, args.batch_size,
                  args.warmup_epochs, args.clip_grad, args.ema, device, args.workers, args.out, eval_set,
                  args.labels_only, args.seed, mix, progress=rank == 0, log=print if rank == 0 else (lambda *_: None))
    if rank == 0:
        import os

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(res, f, indent=2)
        if "eval_accuracy" in res:
            print(f"held-out accuracy: {res['eval_accuracy']:.4f}")
    vdist.cleanup()
    return 0


def run_inspect(args) -> int:
    from .store import LogitStore

    store = LogitStore(args.store)
    m = store.meta
    print(f"store {args.store}: teacher {m.teacher!r}, {m.num_classes} classes, top-{m.k}, {m.encoding} encoding, "
          f"{m.record_bytes} bytes/record, data set of {m.dataset_size}, seed {m.seed}")
    for e in store.epochs():
        keys = store.keys(e)
        _, vals, _ = store.lookup(e, keys[: min(len(keys), 1000)])
        print(f"  epoch {e}: {len(keys)} records in {len(store._index(e)[0])} shard(s), "
              f"mean top-{m.k} mass {vals.sum(-1).mean().item():.4f}")
    return 0


def run_verify(args) -> int:
    """Re-run the teacher on a sample of stored (epoch, key)s with the replayed augmentation."""
    from ..ops import topk_softmax
    from .replay import ReplayAugment, epoch_plan
    from .store import LogitStore

    store = LogitStore(args.store)
    m = store.meta
    teacher, _ = _teacher(args)
    device = torch.device(args.device)
    teacher = teacher.to(device).eval()
    ds, tf, mix, _ = _data_and_transform(args)
    pairs, canonical = epoch_plan(m.dataset_size, args.epoch, m.seed, 1)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(pairs), size=min(args.samples // 2 + 1, len(pairs)), replace=False)
    augment = ReplayAugment(ds, tf, (m.augmentation or {}).get("mixup"))
    keys, images = [], []
    for p in pick:
        seeds, _, _ = store.lookup(args.epoch, pairs[p][canonical[p]])
        if canonical[p].all():
            x, _ = augment.pair(pairs[p], seeds.tolist())
            keys += pairs[p].tolist()
            images += [x[0], x[1]]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = teacher(torch.stack(images).to(device))  # the same precision save-logits used
    v, i = topk_softmax(logits, m.k, values_dtype=torch.float32)
    _, sv, si = store.lookup(args.epoch, keys)
    mismatch = (i.cpu().long() != si).float().mean().item()
    err = (v.cpu() - sv).abs().max().item()
    print(f"verified {len(keys)} records of epoch {args.epoch}: index mismatch rate {mismatch:.4f}, "
          f"max |value error| {err:.2e}")
    return 0 if mismatch < 0.02 else 1
