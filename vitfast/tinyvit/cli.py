"""`vitfast tinyvit save-logits | distill | inspect | verify`."""
from __future__ import annotations

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
    from ..engine.cli_args import HelpFormatter

    s = tsub.add_parser("save-logits", help="run the teacher once, store top-k + augmentation seeds",
                        formatter_class=HelpFormatter)
    from ..engine.cli_args import (WORKERS_HELP, add_checkpoint_every_arg, add_config_arg, add_model_kwargs_arg,
                                   add_progress_arg)

    add_config_arg(s)
    s.add_argument("--teacher", "--model", dest="teacher", help="timm model name (default: the embedded digits teacher)")
    s.add_argument("--checkpoint")
    s.add_argument("--num-classes", type=int, help="classes of the teacher's head, if not its default")
    add_model_kwargs_arg(s)
    s.add_argument("--data", help="ImageFolder training directory (default: embedded digits); a plain folder of "
                                  "images is read as unlabeled images")
    s.add_argument("--unlabeled", action="store_true",
                   help="read --data as unlabeled images (every image under it) even if it has class folders: "
                        "students learn from the soft labels alone")
    s.add_argument("--epochs", default="30", help="N (epochs 0..N-1) or A:B")
    s.add_argument("--input-size", nargs="+", metavar="N|C,H,W",
                   help="images the teacher sees: N, C,H,W or C H W (default: the size it was built for)")
    s.add_argument("--aa", default=None, help="timm auto-augment policy ('none' to disable; default TinyViT's "
                                              "rand-m9-mstd0.5-inc1)")
    s.add_argument("--reprob", type=float, default=None, help="random erasing probability (default 0.25)")
    s.add_argument("--mixup", type=float, default=None, help="mixup alpha (default 0.8)")
    s.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (default 1.0)")
    s.add_argument("--topk", type=int, default=None, help="default 100 (every class for teachers with fewer), or 5 on the 10-class default")
    s.add_argument("--encoding", choices=["exact", "compact"], default="exact")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=None,
                   help=WORKERS_HELP + "; the replayed augmentation runs beside the teacher, and the "
                        "epoch log says which side is waiting")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--checkpoint-seconds", type=float, default=60.0, metavar="S",
                   help="how often the shard being written is checkpointed (its records fsynced, then a progress "
                        "file), so that a run killed without warning (kill -9, a lost node) resumes at most S "
                        "seconds of teacher work back (0: after every batch). SIGTERM and Ctrl-C checkpoint "
                        "where they stop whatever this is; it changes no record")
    s.add_argument("--device", default=d)
    add_progress_arg(s)
    s.add_argument("--out", "--output", dest="out", required=True, help="store directory")
    s.set_defaults(func=run_save)

    t = tsub.add_parser("distill", help="train a student from a store (no teacher in the loop)",
                        formatter_class=HelpFormatter)
    add_config_arg(t)
    t.add_argument("--student", "--model", dest="student",
                   help="timm model name, e.g. tiny_vit_5m_224 (default: embedded digits student)")
    t.add_argument("--checkpoint", help="the student's initial weights (.safetensors or a torch state_dict), "
                                        "e.g. a student distilled on a larger data set; a head of other classes "
                                        "is replaced by a new one for --data's")
    t.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights (needs the hub; a new head for --data's classes)")
    add_model_kwargs_arg(t)
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
    t.add_argument("--amp-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="autocast dtype on CUDA (float16 uses a GradScaler; float32: no autocast)")
    t.add_argument("--compile", action="store_true", help="torch.compile the student's training steps")
    t.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    t.add_argument("--seed", type=int, default=0)
    add_checkpoint_every_arg(t)
    t.add_argument("--device", default=d)
    add_progress_arg(t)
    t.add_argument("--out", "--output", dest="out", required=True, help="checkpoint directory (resumed if present)")
    t.set_defaults(func=run_distill)

    i = tsub.add_parser("inspect", help="summary of a store")
    i.add_argument("store")
    i.set_defaults(func=run_inspect)

    v = tsub.add_parser("verify", help="re-run the teacher on sampled keys and compare with the store")
    v.add_argument("store")
    v.add_argument("--teacher")
    v.add_argument("--checkpoint")
    v.add_argument("--num-classes", type=int)
    add_model_kwargs_arg(v)
    v.add_argument("--data")
    v.add_argument("--samples", type=int, default=64)
    v.add_argument("--epoch", type=int, default=None, help="check only this epoch (default: every epoch)")
    v.add_argument("--device", default=d)
    v.set_defaults(func=run_verify)


def _workers(args) -> int:
    """--workers, or the shared default (vitfast.engine.cli_args.default_workers): the replayed
    augmentation runs beside the teacher/student."""
    from ..engine.cli_args import resolve_workers

    return resolve_workers(args.workers)


def _data_and_transform(args, recipe: dict | None = None):
    """(dataset, transform, mixup args, eval set) for the embedded default or an ImageFolder,
    augmented by `recipe` (save-logits: from the teacher and the options; readers: the store's)."""
    from .defaults import replay_data

    return replay_data(getattr(args, "data", None), recipe)


def _store_recipe(args):
    from .defaults import store_recipe

    return store_recipe(args.store) if getattr(args, "data", None) else None


def _input_size(values) -> tuple | None:
    """--input-size as the other commands take it (N or C,H,W), or as three numbers C H W."""
    from ..engine.cli_args import input_size

    return None if not values else input_size(",".join(values))


def _model_kwargs(args, name_option: str) -> dict:
    """--model-kwargs as a dict; refused without the model they describe."""
    from ..engine.cli_args import model_kwargs
    from ..errors import UserError

    kwargs = model_kwargs(getattr(args, "model_kwargs", None))
    if kwargs and not getattr(args, name_option.lstrip("-").replace("-", "_")):
        raise UserError(f"argument --model-kwargs describes {name_option}: give {name_option} too")
    return kwargs


def _teacher(args):
    kwargs = _model_kwargs(args, "--teacher")
    if not args.teacher:
        from ..models.digits_vit import load_digits_teacher

        return load_digits_teacher(), "vitfast_digits_vit"

    from ..engine.models import create_model
    from ..errors import UserError

    model = create_model(args.teacher, num_classes=getattr(args, "num_classes", None), checkpoint=args.checkpoint,
                         what="--teacher", model_kwargs=kwargs)
    if model.vitfast_weights == "random":
        raise UserError(f"argument --teacher {args.teacher}: no weights given (--checkpoint FILE); a random teacher "
                        "would fill the store with noise")
    return model.eval(), args.teacher


def run_save(args) -> int:
    from .. import distributed as vdist
    from ..engine.cli_args import check_augmentation
    from ..engine.run import check_output_outside
    from ..errors import UserError
    from .train import save_logits

    epochs = _epochs(args.epochs)  # checked before the teacher is even loaded
    size = _input_size(args.input_size)
    if size is not None and not args.data:
        raise UserError("argument --input-size: the embedded digits are 16 x 16 images; it applies with --data")
    if args.batch_size < 2:
        raise UserError(f"argument --batch-size must be >= 2 (pairs of images), got {args.batch_size}")
    if not args.checkpoint_seconds >= 0:  # NaN too
        raise UserError(f"argument --checkpoint-seconds must be >= 0, got {args.checkpoint_seconds}")
    augmentation = {"aa": args.aa, "reprob": args.reprob, "mixup": args.mixup, "cutmix": args.cutmix}
    given = [f"--{k}" for k, v in augmentation.items() if v is not None]
    if args.unlabeled and not args.data:
        raise UserError("argument --unlabeled describes --data: give --data too")
    if given and not args.data:
        raise UserError(f"argument {given[0]}: the embedded digits have their own augmentation; it applies with --data")
    check_augmentation(**augmentation)
    check_output_outside(args.out, data=args.data)
    rank, world, device = vdist.setup(args.device)
    teacher, name = _teacher(args)
    recipe = None
    if args.data:
        from ..data.folders import class_folders
        from .defaults import recipe_for

        recipe = recipe_for(teacher, size, aa=args.aa, reprob=args.reprob, mixup=args.mixup,
                            cutmix=args.cutmix)
        if args.unlabeled or not class_folders(args.data):  # soft labels are the students' only targets
            recipe["unlabeled"] = True
    ds, tf, mix, _ = _data_and_transform(args, recipe)
    classes = len(ds.classes) if hasattr(ds, "classes") else 10  # the embedded digits have 10
    if recipe is not None and recipe.get("unlabeled"):
        classes = teacher.num_classes
        if rank == 0:
            print(f"save-logits: --data read as {len(ds)} unlabeled images: the teacher's soft labels are the "
                  "students' only targets")
    # TinyViT keeps 100 of 21,841 classes; a teacher with 100 or fewer keeps its whole distribution
    k = args.topk if args.topk is not None else (5 if not args.data else min(100, classes))
    if getattr(teacher, "num_classes", classes) != classes:
        raise UserError(f"the teacher has {teacher.num_classes} classes, --data {classes} class folders (or --unlabeled: "
                        "its images without labels, TinyViT's soft labels need none)")
    save_logits(teacher, ds, tf, args.out, epochs, k, args.encoding, args.batch_size, args.seed, mix,
                name, device, _workers(args), progress=rank == 0 and args.progress,
                log=print if rank == 0 else (lambda *_: None), recipe=recipe,
                checkpoint_seconds=args.checkpoint_seconds)
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

    from ..engine import RunDir, file_digest
    from .store import read_meta

    # the output folder remembers its run: another configuration, store or data is refused
    store_id = asdict(read_meta(args.store)) if args.store and not args.labels_only else None
    RunDir(args.out, {k: v for k, v in vars(args).items() if k not in ("func", "device", "out", "workers", "config",
                                                                                 "compile", "checkpoint_every")},
           {"store": store_id, "checkpoint": file_digest(args.checkpoint)}, hints=_longer_hint(args.out),
           folders={"data": args.data, "eval_data": args.eval_data}).start(resume=True)
    rank, world, device = vdist.setup(args.device)
    recipe = None
    if args.data:  # the store's augmentation; labels only: TinyViT's recipe at the student's data config
        from .defaults import recipe_for, store_recipe

        if args.store and not args.labels_only:
            recipe = store_recipe(args.store)
        else:
            from ..data.folders import image_folder

            recipe = recipe_for(_student(args, len(image_folder(args.data, what="--data").classes), weights=False))
    ds, tf, mix, eval_set = _data_and_transform(args, recipe)
    classes = len(ds.classes) if hasattr(ds, "classes") else 10  # the embedded digits have 10
    if recipe is not None and recipe.get("unlabeled"):  # a store of unlabeled images: the teacher's classes
        classes = read_meta(args.store).num_classes
    torch.manual_seed(args.seed)  # the student's initial weights too: a run is reproducible
    student = _student(args, classes)
    if rank == 0 and (args.checkpoint or args.pretrained):
        head = (f"; its {student.vitfast_new_head}-class head replaced by a new {student.num_classes}-class one"
                if student.vitfast_new_head else "")
        print(f"distill: the student starts from {args.checkpoint or 'timm pretrained weights'}{head}")
    _check_student_size(student, recipe, args.student)
    if not args.no_patch:
        from ..patching import patch, patched_modules

        import warnings

        with warnings.catch_warnings():  # nothing to fuse is said below, in the command's own words
            warnings.simplefilter("ignore", RuntimeWarning)
            patch(student)  # the fused window attention (tiny_vit_*, swin_*); other students are unchanged
        if rank == 0:
            n = len(patched_modules(student))
            print(f"distill: fused attention in {n} modules" if n else
                  f"distill: vitfast.patch has nothing to fuse in {type(student).__name__}; it trains unchanged")
    if args.eval_data:  # streamed through the student's own timm data config (timm's validate.py)
        from torchvision.datasets import DatasetFolder

        from ..data.folders import overlap_note
        from ..engine.evaluation import folder_loader

        names = ds.classes if isinstance(ds, DatasetFolder) else None  # labels matched by folder name
        loader = folder_loader(args.eval_data, student, max(args.batch_size, 64), _workers(args), train_classes=names)
        eval_set = lambda: loader  # noqa: E731
        note = overlap_note(args.data, args.eval_data)
        if note and rank == 0:
            print(note)
    res = distill(student, ds, tf, args.store, args.epochs, args.lr, args.weight_decay, args.batch_size,
                  args.warmup_epochs, args.clip_grad, args.ema, device, _workers(args), args.out, eval_set,
                  args.labels_only, args.seed, mix, progress=rank == 0 and args.progress,
                  log=print if rank == 0 else (lambda *_: None), amp_dtype=args.amp_dtype, compile=args.compile,
                  checkpoint_every=args.checkpoint_every)
    if rank == 0:
        import os

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(res, f, indent=2)
        if "eval_accuracy" in res:
            print(f"held-out accuracy: {res['eval_accuracy']:.4f}")
    vdist.cleanup()
    return 0


def _longer_hint(out: str) -> dict:
    """A finished run asked for more epochs: its cosine schedule ended, so the way on is a new run
    from the trained student's weights."""
    import os

    final = os.path.join(out, "student.safetensors")
    if not os.path.exists(final):
        return {}
    return {"epochs": f"to train the finished student longer, start a new run from its weights: --checkpoint {final} "
                      "--output NEW"}


def _student(args, classes: int, weights: bool = True):
    """The student for `classes` classes: random, or from --checkpoint / --pretrained (weights=False:
    random, for reading its data configuration only)."""
    kwargs = _model_kwargs(args, "--student")
    if args.student:
        from ..engine.models import create_model

        return create_model(args.student, num_classes=classes, what="--student", model_kwargs=kwargs,
                            checkpoint=args.checkpoint if weights else None,
                            pretrained=args.pretrained and weights, new_head=True)
    if args.checkpoint or args.pretrained:
        from ..errors import UserError

        raise UserError("arguments --checkpoint / --pretrained describe --student: give --student too")
    from .defaults import digits_student

    return digits_student()


def _check_student_size(student, recipe, name) -> None:
    """The student sees the images the teacher saw (the store's replayed augmentation): a student
    built for another size is refused here, not by an assertion at its first step."""
    from ..engine.data_config import built_size
    from ..errors import UserError

    built = built_size(student)
    if recipe is None or built is None or tuple(recipe["input_size"][1:]) == built:
        return
    h, w = recipe["input_size"][1:]
    raise UserError(f"argument --student {name}: it takes {built[0]}x{built[1]} images, the store's are {h}x{w} "
                    f"(its teacher's size); build the student for them (--model-kwargs img_size={h})")


def run_inspect(args) -> int:
    """What the store holds, epoch by epoch; exit 1 when any epoch is incomplete."""
    from .store import LogitStore

    store = LogitStore(args.store)
    m = store.meta
    print(f"store {args.store}: teacher {m.teacher!r}, {m.num_classes} classes, top-{m.k}, {m.encoding} encoding, "
          f"{m.record_bytes} bytes/record, data set of {m.dataset_size}, seed {m.seed}")
    if m.data:
        counts = m.data.get("class_counts") or {}
        print(f"  data: {m.data.get('kind')}, sha256 {m.data.get('sha256', '')[:16]}"
              + (f", {len(counts)} classes of {min(counts.values())}-{max(counts.values())} images" if counts else ""))
    else:
        print("  data: not recorded (a store written before vitfast kept it: readers cannot check their data against it)")
    incomplete = 0
    for e in store.epochs():
        state = store.epoch_state(e)
        line = f"  epoch {e}: {state.describe()}"
        if state.complete:
            keys = store.keys(e)
            _, vals, _ = store.lookup(e, keys[: min(len(keys), 1000)])
            line += f", mean top-{m.k} mass {vals.sum(-1).mean().item():.4f}"
        else:
            incomplete += 1
        print(line)
    if incomplete:
        print(f"{incomplete} incomplete epoch(s): re-run save-logits with the same --out to complete them")
    return 1 if incomplete else 0


def run_verify(args) -> int:
    """Every epoch's shards (checksums, counts, keys), then the teacher re-run on a sample of
    stored (epoch, key)s with the replayed augmentation."""
    from ..ops import topk_softmax
    from .replay import ReplayAugment, epoch_plan
    from .store import LogitStore, StoreError, check_store_data

    store = LogitStore(args.store)
    m = store.meta
    epochs = store.epochs() if args.epoch is None else [args.epoch]
    if not epochs:
        raise StoreError(f"store '{args.store}' holds no epochs")
    failed = []
    for e in epochs:
        try:
            store.require_complete([e])
            n = len(store.keys(e))  # opens every shard: size, crc32, duplicate and missing keys
            print(f"epoch {e}: {n} records, checksums and keys OK")
        except StoreError as exc:
            failed.append(e)
            print(f"epoch {e}: FAILED: {exc}")
    good = [e for e in epochs if e not in failed]
    if good and args.samples > 0:
        teacher, _ = _teacher(args)
        device = torch.device(args.device)
        teacher = teacher.to(device).eval()
        ds, tf, _, _ = _data_and_transform(args, _store_recipe(args))
        try:
            check_store_data(args.store, m, ds)
        except StoreError as exc:
            print(f"data check FAILED: {exc}")
            failed.append("data")
        augment = ReplayAugment(ds, tf, (m.augmentation or {}).get("mixup"))
        rng = np.random.default_rng(0)
        pairs_each = max(1, args.samples // (2 * len(good)))  # spread over every epoch checked
        keys, epochs_of, images = [], [], []
        for e in good:
            pairs, canonical = epoch_plan(m.dataset_size, e, m.seed, 1)
            for p in rng.choice(len(pairs), size=min(pairs_each, len(pairs)), replace=False):
                if canonical[p].all():
                    seeds, _, _ = store.lookup(e, pairs[p])
                    x, _ = augment.pair(pairs[p], seeds.tolist())
                    keys += pairs[p].tolist()
                    epochs_of += [e, e]
                    images += [x[0], x[1]]
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = teacher(torch.stack(images).to(device))  # the same precision save-logits used
        v, i = topk_softmax(logits, m.k, values_dtype=torch.float32)
        sv = torch.cat([store.lookup(e, [k])[1] for e, k in zip(epochs_of, keys)])
        si = torch.cat([store.lookup(e, [k])[2] for e, k in zip(epochs_of, keys)])
        mismatch = (i.cpu().long() != si).float().mean().item()
        err = (v.cpu() - sv).abs().max().item()
        print(f"teacher re-run on {len(keys)} records of {len(good)} epoch(s): index mismatch rate {mismatch:.4f}, "
              f"max |value error| {err:.2e}")
        if mismatch >= 0.02:
            print("teacher check FAILED: the store does not match this teacher and data (or its augmentation)")
            failed.append("teacher")
    print("store verified" if not failed else f"store FAILED verification: {failed}")
    return 1 if failed else 0
