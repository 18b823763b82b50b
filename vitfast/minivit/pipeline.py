"""The MiniViT pipeline: multiplex a pretrained model, train the Mini model with weight
distillation from the original (predictions, attention relations, hidden-state relations) on the
shared engine, save it (safetensors + structure) and report.

    run_minivit(MiniViTConfig(teacher="deit_small_patch16_224", checkpoint="deit_s.safetensors",
                              data="train/", eval_data="val/", share="2", output="mini_deit_s"))

With no teacher and no data, the embedded default: the digits ViT teacher and data set, and the
paper's ablation in small (run_ablation)."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as vdist
from ..data.folders import ImageFiles, overlap_note
from ..engine import RunDir, RunLog, TrainConfig, file_digest, fit
from ..engine.checkpoint import atomic_write_json
from ..engine.run import check_output_outside, forgets_unsaved_runs_on_refusal
from ..engine.cli_args import check_augmentation, default_workers
from ..engine.data import TransformedTensors, epoch_loader, steps_per_epoch, train_transform
from ..engine.data_config import model_data_config
from ..engine.evaluation import evaluate, folder_loader, tensor_batches
from ..engine.measure import count_macs, count_params, throughput
from ..errors import UserError
from .distill import (Capture, attention_relation_loss, check_pairs, default_pairs, hidden_relation_loss,
                      soft_cross_entropy)
from .multiplex import multiplex, param_groups, save_mini
from .relations import attention_relation_loss_lean, hidden_relation_loss_lean

RELATION_IMPLS = ("fused", "chunked", "autograd")

DIGITS = "vitfast_digits_vit"


@dataclass
class MiniViTConfig:
    # the model to compress (None: the embedded digits teacher) and its weights
    teacher: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    # multiplexing
    share: str = "2"                    # layers per group, "stage", or groups "0,1;2,3"
    init: str = "first"                 # first | mean | random (the official from-scratch recipe)
    heads_mix: bool = True              # head-mixing transforms in the attention
    mlp_transform: str | None = "residual"  # residual | official | None
    init_from: str | None = None        # a saved Mini model (load_mini folder) to start from, same structure
    # weight distillation (official Mini-Swin defaults)
    alpha: float = 0.0                  # ground-truth CE weight; predictions get 1 - alpha
    distill_predictions: bool = True
    temperature: float = 1.0
    attn_weight: float = 1.0            # attention relations (MiniLMv2)
    hidden_weight: float = 0.1          # hidden-state relations
    relation_heads: int = 1
    # the model distilled from (official Mini-Swin: Swin-B for every size); None: the original
    distill_teacher: str | None = None
    distill_checkpoint: str | None = None
    distill_pretrained: bool = False
    distill_model_kwargs: dict = field(default_factory=dict)
    # "fused": each relation loss computes its value and its gradient together, a chunk of
    # windows at a time, and keeps only the (B, N, C) gradient (vitfast.minivit.relations), the
    # softmaxes, cross-entropy and gradient of every relation row in one pass of the fused
    # dense soft-target CE kernel; "chunked": the same with eager float32 softmaxes (~15 passes
    # over each chunk's relations); "autograd": the direct formulas, whose saved (B, heads, N, N)
    # relations grow to GBs at ImageNet shapes. Same values.
    relation_impl: str = "fused"
    layer_pairs: str | None = None      # "1:1,3:3" (student:teacher); default: default_pairs
    # a TinyViT logit store (vitfast tinyvit save-logits) as the prediction term's teacher: the
    # images are replayed with the store's augmentation and mixup, and the teacher itself runs
    # only for the relation losses (none at all with --attn-weight 0 --hidden-weight 0)
    store: str | None = None
    # data (ImageFolder; None: embedded digits)
    data: str | None = None
    eval_data: str | None = None
    unlabeled: bool = False             # --data as unlabeled images even with class folders (--alpha 0)
    input_size: tuple | None = None
    aa: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    batch_size: int = 128
    workers: int = field(default_factory=default_workers)  # vitfast.engine.cli_args
    # training (vitfast.engine)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, lr=5e-4, weight_decay=0.05,
                                                                   warmup_epochs=1, clip_grad=5.0))
    output: str = "minivit_out"
    resume: bool = True
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    progress: bool = True

    def validate(self) -> None:
        self.train.validate()
        if self.teacher is None and self.model_kwargs:
            raise UserError("argument --model-kwargs describes --teacher: give --teacher too")
        if self.teacher is None and self.data is None and self.input_size is not None:
            raise UserError("argument --input-size: the embedded digits are 16 x 16 images; it applies with --data")
        if not 0 <= self.alpha <= 1:
            raise UserError(f"argument --alpha must lie in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise UserError(f"argument --temperature must be > 0, got {self.temperature}")
        check_augmentation(self.aa, self.reprob, self.mixup, self.cutmix, self.smoothing)
        for name in ("attn_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"argument --{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.relation_impl not in RELATION_IMPLS:
            raise UserError(f"argument --relation-impl must be one of {', '.join(RELATION_IMPLS)}, "
                            f"got {self.relation_impl!r}")
        if self.relation_heads < 1:
            raise UserError(f"argument --relation-heads must be >= 1, got {self.relation_heads}")
        if self.batch_size < 2:
            raise UserError(f"argument --batch-size must be >= 2, got {self.batch_size}")
        if self.workers < 0:
            raise UserError(f"argument --workers must be >= 0, got {self.workers}")
        if self.unlabeled and (self.alpha > 0 or self.data is None):
            raise UserError("argument --unlabeled reads --data without labels: it needs --data and --alpha 0 "
                            f"(got --alpha {self.alpha})" if self.data is not None else
                            "argument --unlabeled describes --data: give --data too")
        if self.store is not None and not (self.distill_predictions and self.alpha < 1):
            raise UserError("--store feeds the prediction distillation term: it needs --alpha < 1 and no "
                            "--no-prediction-distillation")
        if (self.teacher is None) != (self.data is None):
            raise UserError("give both --teacher and --data (an ImageFolder), or neither (the embedded default)")
        if self.distill_teacher is None and (self.distill_checkpoint or self.distill_pretrained
                                             or self.distill_model_kwargs):
            raise UserError("argument --distill-checkpoint / --distill-pretrained / --distill-model-kwargs describe "
                            "--distill-teacher: give --distill-teacher too")
        if self.distill_teacher is not None and self.teacher is None:
            raise UserError("argument --distill-teacher: the embedded default distils from its own teacher; it "
                            "applies with --teacher and --data")

    @property
    def uses_teacher(self) -> bool:
        """Whether the teacher runs in the training step (a store replaces it for predictions)."""
        predictions = self.distill_predictions and self.alpha < 1 and self.store is None
        return predictions or self.attn_weight > 0 or self.hidden_weight > 0


def parse_pairs(text: str | None, student, teacher) -> list[tuple[int, int]]:
    if not text:
        return default_pairs(student, teacher)
    try:
        return [tuple(int(v) for v in p.split(":")) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise UserError(f"argument --layer-pairs must look like '1:1,3:3' (student:teacher), got {text!r}") from exc


# ---------------------------------------------------------------------------------------------
# Inputs: teacher and data


def load_teacher(cfg: MiniViTConfig):
    """(teacher in eval mode, its timm name, the kwargs that rebuild it)."""
    if cfg.teacher is None:
        from ..models.digits_vit import load_digits_teacher

        return load_digits_teacher(), DIGITS, {}
    from ..engine.models import create_model

    kwargs = {**cfg.model_kwargs, **({"num_classes": cfg.num_classes} if cfg.num_classes else {})}
    model = create_model(cfg.teacher, num_classes=cfg.num_classes, checkpoint=cfg.checkpoint,
                         pretrained=cfg.pretrained, what="--teacher", model_kwargs=cfg.model_kwargs)
    if model.vitfast_weights == "random":
        raise UserError(f"the teacher '{cfg.teacher}' has random weights: give --checkpoint FILE or --pretrained")
    return model.eval(), cfg.teacher, kwargs


def load_distill_teacher(cfg: MiniViTConfig) -> nn.Module | None:
    """The model distilled from when it is not the original (--distill-teacher), with trained
    weights; None: the original (check_distill_teacher compares the two)."""
    if cfg.distill_teacher is None:
        return None
    from ..engine.models import create_model

    own = "num_classes" in cfg.distill_model_kwargs  # else --num-classes, which describes the data, applies
    model = create_model(cfg.distill_teacher, num_classes=None if own else cfg.num_classes,
                         checkpoint=cfg.distill_checkpoint,
                         pretrained=cfg.distill_pretrained, what="--distill-teacher",
                         model_kwargs=cfg.distill_model_kwargs)
    if model.vitfast_weights == "random":
        raise UserError(f"argument --distill-teacher {cfg.distill_teacher}: random weights; give --distill-checkpoint "
                        "FILE or --distill-pretrained")
    return model.eval()


def check_distill_teacher(cfg: MiniViTConfig, original: nn.Module, model: nn.Module) -> None:
    """A teacher other than the original must have its classes (for the prediction term) and take
    its images (both see the same batches); token counts at the paired layers are checked once the
    layer pairs are known (distill.check_pairs)."""
    from ..engine.data_config import built_size

    what = f"argument --distill-teacher {cfg.distill_teacher or type(model).__name__}"
    mine, theirs = getattr(original, "num_classes", None), getattr(model, "num_classes", None)
    if mine != theirs and cfg.distill_predictions and cfg.alpha < 1 and cfg.store is None:
        raise UserError(f"{what}: {theirs} classes, the model to compress {mine}; the prediction term needs the same "
                        "classes")
    a, b = built_size(original), built_size(model)
    if a is not None and b is not None and a != b:
        raise UserError(f"{what}: it takes {b[0]}x{b[1]} images, the model to compress {a[0]}x{a[1]}; both see the "
                        "same images (--distill-model-kwargs img_size=...)")


def load_data(cfg: MiniViTConfig, teacher):
    """(training dataset, eval batches factory or None, what the eval figures are measured on)."""
    if cfg.data is None:
        from torchvision import transforms

        from ..tinyvit.defaults import BACKGROUND, digits_train_set

        # Shifts of up to one pixel: the augmentation the teacher was trained with. Distillation
        # needs targets the teacher gets right: on the TinyViT default's stronger augmentation
        # (rotations, 2-pixel shifts) this teacher is right on only 86-88% of the training images
        # (100% on the clean ones), and distilling from it (alpha = 0) lost ~1 point to plain
        # label training (README: MiniViT, "Why the embedded default distils on 1-pixel shifts").
        train, (ex, ey) = digits_train_set()
        shift = transforms.RandomAffine(degrees=0, translate=(1 / 16, 1 / 16), fill=BACKGROUND)
        ds = TransformedTensors(train.tensors[0], train.tensors[1], shift)
        return ds, (lambda: tensor_batches(ex, ey, 256)), f"the {len(ex)} held-out embedded digits images"
    from ..data.folders import class_folders, image_files, image_folder

    transform = train_transform(teacher, cfg.input_size, cfg.aa, cfg.reprob)
    classes = getattr(teacher, "num_classes", None)
    found = class_folders(cfg.data)
    if cfg.alpha == 0 and (cfg.unlabeled or not found):
        # no label loss: the teacher's predictions and relations are the targets, so unlabeled images
        # (a plain folder; with --unlabeled, any folders) will do
        ds = image_files(cfg.data, transform, "--data")
    else:
        if not found and cfg.alpha > 0 and os.path.isdir(cfg.data):
            raise UserError(f"--data '{cfg.data}' has no class folders, and --alpha {cfg.alpha} trains on labels "
                            "(one sub-folder of images per class); or --alpha 0: distillation alone needs no labels")
        ds = image_folder(cfg.data, transform, "--data")
        if classes is not None and classes != len(ds.classes):
            hint = (" (or --alpha 0: distillation alone needs no labels)" if cfg.alpha > 0 else
                    " (or --unlabeled: distillation alone reads them as unlabeled images)")
            raise UserError(f"--data has {len(ds.classes)} classes, the teacher's head {classes}: pass --num-classes "
                            f"{len(ds.classes)} with a checkpoint of that many classes, or fix the folder{hint}")
    if cfg.eval_data is None:
        return ds, None, None
    loader = folder_loader(cfg.eval_data, teacher, cfg.batch_size, cfg.workers, cfg.input_size, ds.classes or None)
    note = overlap_note(cfg.data, cfg.eval_data)  # the report says so beside every accuracy
    return ds, (lambda: loader), f"--eval-data '{cfg.eval_data}' ({len(loader.dataset)} images){f' ({note})' if note else ''}"


# ---------------------------------------------------------------------------------------------
# One training run


def _loss_fn(cfg: MiniViTConfig, teacher, cap_s, cap_t, mixup, device, num_classes):
    def loss_fn(model, batch):
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        out = model(x)
        parts, total = {}, torch.zeros((), device=device)
        t_out = None
        if cfg.uses_teacher:
            with torch.no_grad():
                t_out = teacher(x)
        if cfg.alpha > 0:
            if y.dim() == 2:  # mixup / cutmix soft targets
                ce = -(y * F.log_softmax(out.float(), -1)).sum(-1).mean()
            else:
                ce = F.cross_entropy(out.float(), y, label_smoothing=cfg.smoothing)
            total = total + cfg.alpha * ce
            parts["ce"] = ce.detach()
        if cfg.distill_predictions and cfg.alpha < 1:
            kd = soft_cross_entropy(out, t_out, cfg.temperature)
            total = total + (1 - cfg.alpha) * kd
            parts["kd"] = kd.detach()
        total = _add_relations(cfg, cap_s, cap_t, parts, total)
        return total, len(x), parts
    return loss_fn


def _store_loss_fn(cfg: MiniViTConfig, teacher, cap_s, cap_t, device):
    """The loss on a store's replayed batches: the stored top-k soft labels (fused sparse CE) for
    the prediction term, the mixed labels for the CE term, the teacher only for the relations."""
    from ..ops import sparse_soft_target_cross_entropy

    def loss_fn(model, batch):
        kb, _, cb, xb, tb, vb, ib = batch
        if not bool(cb.all()):  # padding pairs of the last batch
            keep = cb.bool()
            xb, kb, tb, vb, ib = xb[keep], kb[keep], tb[keep], vb[keep], ib[keep]
        x = xb.to(device, non_blocking=True)
        out = model(x)
        parts, total = {}, torch.zeros((), device=device)
        if cfg.uses_teacher:
            with torch.no_grad():
                teacher(x)  # fills the relation captures
        if cfg.alpha > 0:
            ce = -(tb.to(device, non_blocking=True) * F.log_softmax(out.float(), -1)).sum(-1).mean()
            total = total + cfg.alpha * ce
            parts["ce"] = ce.detach()
        kd = sparse_soft_target_cross_entropy(out, vb.to(device, non_blocking=True), ib.to(device, non_blocking=True))
        total = total + (1 - cfg.alpha) * kd
        parts["kd"] = kd.detach()
        total = _add_relations(cfg, cap_s, cap_t, parts, total)
        return total, len(kb), parts
    return loss_fn


def _add_relations(cfg, cap_s, cap_t, parts, total):
    """total + the weighted attention- and hidden-relation losses of the captured layer pairs
    (recorded, detached, in parts)."""
    if cap_s is None:
        return total
    sq, sh = cap_s.take()
    tq, th = cap_t.take()
    if cfg.relation_impl == "autograd":
        attn_loss, hidden_loss = attention_relation_loss, hidden_relation_loss
    else:
        fused = cfg.relation_impl == "fused"
        hidden_loss = hidden_relation_loss_lean

        def attn_loss(a, b, heads):
            return attention_relation_loss_lean(a, b, heads, fused=fused)
    if cfg.attn_weight > 0:
        rel = sum(attn_loss(a, b, cfg.relation_heads) for a, b in zip(sq, tq)) / len(sq)
        total = total + cfg.attn_weight * rel
        parts["attn_rel"] = rel.detach()
    if cfg.hidden_weight > 0:
        hid = sum(hidden_loss(a, b) for a, b in zip(sh, th)) / len(sh)
        total = total + cfg.hidden_weight * hid
        parts["hidden_rel"] = hid.detach()
    return total


def _longer_hint(out_dir: str) -> dict:
    """A finished run asked for more epochs: its cosine schedule ended; the way on is a new run
    from its Mini model."""
    final = os.path.join(out_dir, "mini_model")
    if not os.path.exists(os.path.join(final, "structure.json")):
        return {}
    return {"train.epochs": f"to train the finished Mini model longer, start a new run from it: --init-from {final} "
                            "--output NEW"}


def _saved_digest(path: str | None) -> str | None:
    """Digest of a saved Mini model's weights (part of a run's identity), None without one."""
    if not path:
        return None
    folder = (os.path.dirname(path) or ".") if os.path.isfile(path) else path
    if not os.path.exists(os.path.join(folder, "structure.json")):
        raise UserError(f"argument --init-from '{path}' holds no structure.json: not a saved Mini model (a run's "
                        "mini_model/ folder)")
    return file_digest(os.path.join(folder, "model.safetensors"), "argument --init-from: weights")


def start_from_saved(student: nn.Module, path: str) -> None:
    """Loads a saved Mini model (save_mini / `vitfast minivit`'s mini_model/) into `student`, the
    Mini model just built from the teacher: a finished run trained longer, or on other data. Its
    structure must be the one built (groups, transforms, shapes); a difference is named."""
    from ..engine.checkpoint import CheckpointError, describe_mismatch, read_saved_model
    from .multiplex import FORMAT

    spec, state = read_saved_model(path, FORMAT, "Mini model")
    built = {"groups": student.minivit["groups"], "heads_mix": student.minivit["heads_mix"],
             "mlp_transform": student.minivit["mlp_transform"]}
    for key, value in json.loads(json.dumps(built)).items():  # as structure.json holds them
        if spec.get(key) != value:
            raise UserError(f"argument --init-from '{path}': its {key} is {spec.get(key)!r}, the Mini model built "
                            f"here has {value!r} (give the --share / --no-head-mix / --mlp-transform it was made with)")
    try:
        describe_mismatch(student, state, path)
    except CheckpointError as exc:
        raise UserError(f"argument --init-from: {exc}") from exc
    student.load_state_dict(state)


@forgets_unsaved_runs_on_refusal
def train_mini(cfg: MiniViTConfig, teacher, teacher_name: str, teacher_kwargs: dict, dataset, eval_batches,
               out_dir: str, log: RunLog | None = None, distill_teacher: nn.Module | None = None) -> dict:
    """Multiplex `teacher`, train the Mini model into out_dir (resumable, configuration-checked),
    save it; returns {history, eval, params, model}. The Mini model is distilled from
    `distill_teacher` (any timm model with the same classes and tokens at the paired layers: the
    official Mini-Swin distils every size from Swin-B), by default from `teacher` itself."""
    cfg.validate()
    rank, world = vdist.rank_world()
    log = log or RunLog(out_dir, rank == 0)
    device = torch.device(cfg.device)
    from ..tinyvit.store import read_meta

    store_id = asdict(read_meta(cfg.store)) if cfg.store else None
    check_output_outside(out_dir, eval_data=cfg.eval_data)  # --data: RunDir's folders
    # compile and checkpoint_every change the speed or the saving, not the run: not part of its identity
    run = RunDir(out_dir, {**asdict(cfg), "train": {k: v for k, v in asdict(cfg.train).items()
                                                     if k not in ("compile", "checkpoint_every")}},
                 {"teacher": teacher_name, "checkpoint": file_digest(cfg.checkpoint),
                  "store": store_id, "distill_checkpoint": file_digest(cfg.distill_checkpoint),
                  "init_from": _saved_digest(cfg.init_from)},
                 volatile=("workers", "progress", "output", "device", "resume", "relation_impl"),
                 hints=_longer_hint(out_dir), folders={"data": cfg.data})
    resumed = run.start(cfg.resume)
    note = overlap_note(cfg.data, cfg.eval_data)  # logged once the run holds its folder
    if note:
        log(note)
    torch.manual_seed(cfg.train.seed)  # the init ("random") and the first epoch's augmentation
    student = multiplex(teacher, cfg.share, init=cfg.init, heads_mix=cfg.heads_mix, mlp_transform=cfg.mlp_transform)
    if cfg.init_from:
        start_from_saved(student, cfg.init_from)
    original = teacher
    if distill_teacher is not None:  # from here on, "teacher" is the model distilled from
        check_distill_teacher(cfg, original, distill_teacher)
        teacher = distill_teacher
    teacher = teacher.to(device).eval()  # runs under no_grad only; its parameters are left as they are
    student.to(device)
    cap_s = cap_t = None
    pairs = []
    if cfg.attn_weight > 0 or cfg.hidden_weight > 0:
        pairs = parse_pairs(cfg.layer_pairs, student, teacher)
        cap_s = Capture(student, [s for s, _ in pairs], qkv=cfg.attn_weight > 0, hidden=cfg.hidden_weight > 0)
        cap_t = Capture(teacher, [t for _, t in pairs], qkv=cfg.attn_weight > 0, hidden=cfg.hidden_weight > 0)
        try:
            check_pairs(student, teacher, cap_s, cap_t, pairs, model_data_config(original, cfg.input_size)["input_size"],
                        device)
        except Exception:
            cap_s.close()  # the teacher may be the caller's model: leave no hooks on it
            cap_t.close()
            raise
    mixup = None
    num_classes = getattr(original, "num_classes", None)
    if cfg.data is not None and (cfg.mixup > 0 or cfg.cutmix > 0):
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
    steps = steps_per_epoch(len(dataset), cfg.batch_size)
    batches = lambda e, start=0: epoch_loader(dataset, cfg.batch_size, e, cfg.train.seed, cfg.workers,  # noqa: E731
                                              start=start)
    loss_fn = _loss_fn(cfg, teacher, cap_s, cap_t, mixup, device, num_classes)
    if cfg.store is not None:  # the store's replayed images and soft labels instead of the teacher's
        from ..tinyvit.defaults import replay_data, store_recipe
        from ..tinyvit.train import StoreReplay

        raw, transform, _, _ = replay_data(cfg.data, store_recipe(cfg.store) if cfg.data else None)
        replay = StoreReplay(cfg.store, raw, transform, cfg.batch_size, cfg.workers)
        replay.check_classes(student)
        batches, steps, loss_fn = replay, replay.steps_per_epoch, _store_loss_fn(cfg, teacher, cap_s, cap_t, device)

    def evaluate_epoch(model, ema, epoch):
        if eval_batches is None:
            return None
        res = evaluate(model, eval_batches(), device, cfg.train.amp_dtype)
        out = {"top1": res["top1"], "top5": res["top5"], "loss": res["loss"]}
        if ema is not None:
            out["ema_top1"] = evaluate(ema, eval_batches(), device, cfg.train.amp_dtype)["top1"]
        return out

    source = f", distilled from {cfg.distill_teacher or type(teacher).__name__}" if teacher is not original else ""
    unlabeled = "unlabeled " if isinstance(dataset, ImageFiles) else ""  # --alpha 0 on images without classes
    log(f"minivit: {teacher_name} {count_params(original):,} parameters -> Mini {count_params(student):,} "
        f"(groups {student.minivit['groups']}, {len(dataset)} {unlabeled}training images, {steps} steps/epoch{source}"
        f"{', predictions from the store ' + cfg.store if cfg.store else ''}{', resuming' if resumed else ''})")
    try:
        result = fit(student, cfg.train, batches=batches, steps_per_epoch=steps, loss_fn=loss_fn,
                     device=device, out_dir=out_dir, evaluate=evaluate_epoch, log=log, progress=cfg.progress,
                     desc="minivit", params=param_groups(student, cfg.train.weight_decay))
    finally:
        if cap_s is not None:
            cap_s.close()
            cap_t.close()
    final = result.ema if result.ema is not None else student
    if rank == 0:
        save_mini(final, os.path.join(out_dir, "mini_model"), teacher_name, teacher_kwargs,
                  extra={"layer_pairs": pairs, "trained_epochs": cfg.train.epochs})
    vdist.barrier()
    last = result.history[-1] if result.history else {}
    return {"history": result.history, "eval_top1": last.get("eval_top1"), "params": count_params(final),
            "model": final, "pairs": pairs}


# ---------------------------------------------------------------------------------------------
# The embedded default: the paper's ablation in small

VARIANTS = {  # name: config changes (from the full method's config)
    "sharing only": dict(heads_mix=False, mlp_transform=None, alpha=1.0, attn_weight=0.0, hidden_weight=0.0),
    "+ transforms": dict(alpha=1.0, attn_weight=0.0, hidden_weight=0.0),
    "+ prediction distillation": dict(alpha=0.0, attn_weight=0.0, hidden_weight=0.0),
    "+ relation distillation (full)": dict(alpha=0.0),
}


def digits_config(**overrides) -> MiniViTConfig:
    """The embedded default's recipe: from the pretrained digits teacher, light augmentation (the
    images are 16 x 16), a short schedule."""
    base = MiniViTConfig(aa=None, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1, batch_size=64, workers=0,
                         train=TrainConfig(epochs=12, lr=1e-3, weight_decay=0.05, warmup_epochs=1, clip_grad=5.0))
    return replace(base, **overrides)


def run_ablation(cfg: MiniViTConfig, seeds=(0, 1, 2), shares=("2", "all"), log=print) -> dict:
    """original / sharing only / + transforms / + prediction distillation / + relations (full) at
    each sharing degree, over seeds, on the held-out digits; the init comparison (first vs mean)."""
    teacher, name, kwargs = load_teacher(cfg)
    dataset, eval_batches, eval_what = load_data(cfg, teacher)
    device = torch.device(cfg.device)
    base_acc = evaluate(teacher, eval_batches(), device)["top1"]
    rows = {"original": {"params": count_params(teacher), "top1": [base_acc], "share": "-"}}
    init_rows = {}
    histories = {}
    for share in shares:
        for init in ("first", "mean"):  # which starting point is closer to the original
            m = multiplex(teacher, share, init=init)
            init_rows[f"{share}/{init}"] = evaluate(m, eval_batches(), device)["top1"]
        for variant, changes in VARIANTS.items():
            accs = []
            for seed in seeds:
                vcfg = replace(cfg, share=share, **changes, train=replace(cfg.train, seed=seed))
                out_dir = os.path.join(cfg.output, "runs", f"share_{share}", variant.strip("+ ").replace(" ", "_")
                                       .replace("(", "").replace(")", ""), f"seed{seed}")
                res = train_mini(vcfg, copy.deepcopy(teacher), name, kwargs, dataset, eval_batches, out_dir,
                                 RunLog(out_dir, vdist.rank_world()[0] == 0, echo=False))
                accs.append(res["eval_top1"])
                histories[(share, variant, seed)] = res["history"]
                params = res["params"]
                log(f"ablation: share {share}, {variant}, seed {seed}: held-out top-1 {100 * res['eval_top1']:.2f}%")
            rows[f"{variant} [share {share}]"] = {"params": params, "top1": accs, "share": share}
    return {"rows": rows, "init": init_rows, "histories": histories, "eval_on": eval_what, "teacher": name,
            "seeds": list(seeds), "shares": list(shares)}


# ---------------------------------------------------------------------------------------------
# The entry point


@forgets_unsaved_runs_on_refusal
def run_minivit(cfg: MiniViTConfig, ablation: bool | None = None, seeds=(0, 1, 2), shares=("2", "all")) -> dict:
    """One function for `vitfast minivit`: with the embedded default (no teacher, no data) the
    ablation over seeds and sharing degrees (unless ablation=False); otherwise one Mini model of
    cfg.teacher trained on cfg.data. Writes report.md, report.json, training_curves.png and the
    Mini model (mini_model/: safetensors + structure.json) into cfg.output."""
    import json
    import shutil

    from .report import ablation_markdown, compare_models, plot_curves, single_markdown

    cfg.validate()
    rank, _ = vdist.rank_world()
    log = RunLog(cfg.output, rank == 0)
    if ablation is None:
        ablation = cfg.teacher is None and cfg.store is None
    if ablation:
        if cfg.teacher is not None or cfg.store is not None or cfg.init_from is not None:
            raise UserError("the ablation runs on the embedded default only, without a store, each variant from the "
                            "teacher; drop --ablation or --teacher/--data/--store/--init-from")
        ab = run_ablation(cfg, seeds, shares, log)
        if rank == 0:
            curves = {f"{v} [share {s}]": h for (s, v, seed), h in ab["histories"].items() if seed == seeds[0]}
            plot_curves(curves, os.path.join(cfg.output, "training_curves.png"),
                        f"MiniViT on the embedded digits (seed {seeds[0]})")
            best = os.path.join(cfg.output, "runs", f"share_{shares[0]}", "relation_distillation_full",
                                f"seed{seeds[0]}", "mini_model")
            shutil.copytree(best, os.path.join(cfg.output, "mini_model"), dirs_exist_ok=True)
            report = {k: v for k, v in ab.items() if k != "histories"}
            atomic_write_json(os.path.join(cfg.output, "report.json"), report)
            with open(os.path.join(cfg.output, "report.md"), "w") as f:
                f.write(ablation_markdown(ab))
        return ab
    teacher, name, kwargs = load_teacher(cfg)
    distill_teacher = load_distill_teacher(cfg)
    dataset, eval_batches, eval_what = load_data(cfg, teacher)
    res = train_mini(cfg, copy.deepcopy(teacher), name, kwargs, dataset, eval_batches, cfg.output, log,
                     distill_teacher=distill_teacher)
    report = {"teacher": name, "distilled_from": cfg.distill_teacher, "share": cfg.share, "groups": res["model"].minivit["groups"],
              "heads_mix": cfg.heads_mix, "mlp_transform": cfg.mlp_transform, "pairs": res["pairs"],
              "eval_on": eval_what, "history": res["history"]}
    if rank == 0:
        device = torch.device(cfg.device)
        example = next(iter(eval_batches()))[0][:32] if eval_batches else \
            torch.randn(32, *model_data_config(teacher, cfg.input_size)["input_size"])

        def acc(m):
            return {"top1": evaluate(m, eval_batches(), device)["top1"]} if eval_batches else {}

        report["comparison"] = compare_models(teacher, res["model"], example, device, acc)
        plot_curves({"Mini": res["history"]}, os.path.join(cfg.output, "training_curves.png"), f"MiniViT: {name}")
        atomic_write_json(os.path.join(cfg.output, "report.json"), report)
        with open(os.path.join(cfg.output, "report.md"), "w") as f:
            f.write(single_markdown(report))
    vdist.barrier()
    return report
