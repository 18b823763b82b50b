"""Command-line options every vitfast training command shares, spelled like timm's train.py
(--model, --num-classes, --checkpoint, --pretrained, --epochs, --lr, --amp-dtype, --output,
--resume, --config FILE.yaml ...), and the two-step parse that lets a YAML file set defaults."""
from __future__ import annotations

import argparse
import os

import torch

from ..errors import UserError
from .trainer import AMP_DTYPES, TrainConfig


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of option values (keys as the long options, "
                   "dashes or underscores); command-line options win")


def apply_config_file(p: argparse.ArgumentParser, argv) -> None:
    """timm's train.py pattern: read --config first, make its values the parser's defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    import yaml

    try:
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
    except OSError as exc:
        raise UserError(f"argument --config: cannot read '{known.config}' ({exc.strerror})") from exc
    if not isinstance(values, dict):
        raise UserError(f"argument --config: '{known.config}' must hold a mapping of option: value")
    dests = {a.dest for a in p._actions}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise UserError(f"argument --config: '{known.config}' sets unknown option(s) {', '.join(unknown)}")
    p.set_defaults(**values)


def add_train_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--clip-grad", type=float, default=d.clip_grad)
    g.add_argument("--ema", type=float, default=d.ema_decay, help="EMA decay, e.g. 0.9998 (off by default)")
    g.add_argument("--amp-dtype", choices=list(AMP_DTYPES), default=d.amp_dtype,
                   help="autocast dtype on CUDA (float32: off; CPU runs in float32)")
    g.add_argument("--compile", action="store_true", default=d.compile, help="torch.compile the model's training steps")
    g.add_argument("--seed", type=int, default=d.seed)
    add_checkpoint_every_arg(g, d.checkpoint_every)


def add_checkpoint_every_arg(g, default: int = 0, what: str = "an epoch") -> None:
    g.add_argument("--checkpoint-every", type=int, default=default, metavar="STEPS",
                   help=f"also checkpoint every STEPS steps within {what}, so that a run killed without warning "
                        "(kill -9, a lost node) loses at most that many (0: at epoch ends only). A run resumes at the step exactly, "
                        "its loader starting at that batch. SIGTERM (a scheduler's stop) saves at the current "
                        "step whatever this is")


def train_config(a) -> TrainConfig:
    cfg = TrainConfig(epochs=a.epochs, lr=a.lr, weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs,
                      min_lr=a.min_lr, clip_grad=a.clip_grad, ema_decay=a.ema, amp_dtype=a.amp_dtype,
                      compile=a.compile, seed=a.seed, checkpoint_every=a.checkpoint_every)
    cfg.validate()
    return cfg


def default_workers() -> int:
    """min(4, CPUs - 1) and at least 1: the augmentation leaves the main process, which keeps the
    model (results do not depend on it). On 2 cores one worker leaves the epoch time as it is (the
    cores are busy either way) but takes the main process from ~45% waiting on augmentation to ~15%
    (benchmarks/cpu_save_logits.py)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def resolve_workers(value: int | None) -> int:
    """--workers as given (0: load in the main process), or default_workers() when not given."""
    if value is None:
        return default_workers()
    if value < 0:
        raise UserError(f"argument --workers must be >= 0, got {value}")
    return value


WORKERS_HELP = "data-loader worker processes; 0 loads in the main process; not given: min(4, CPUs - 1), at least 1"


def add_run_args(p: argparse.ArgumentParser, output: str) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--output", "--out", default=output, help="run folder (resumed if it holds the same run)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse to continue a run already in --output instead of resuming it")
    g.add_argument("--workers", type=int, default=None, help=WORKERS_HELP)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_progress_arg(g)


def add_progress_arg(p) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress output (otherwise a bar on a terminal; in a log file, a line every 30 s "
                        "of a longer loop; VITFAST_PROGRESS=bar|lines|off)")


def input_size(value) -> tuple | None:
    """'224' or '3,224,224' -> (3, 224, 224); None stays None."""
    if value is None:
        return None
    parts = [int(v) for v in str(value).replace(" ", ",").split(",") if v]
    if len(parts) == 1:
        return (3, parts[0], parts[0])
    if len(parts) != 3 or min(parts) < 1:
        raise UserError(f"argument --input-size must be N or C,H,W, got {value!r}")
    return tuple(parts)


def check_augmentation(aa=None, reprob=None, mixup=None, cutmix=None, smoothing=None) -> None:
    """The augmentation options in range and --aa a policy timm can build, or a UserError naming the
    first that is not -- before any model or data is loaded (None: not given). Out of range, they
    used to run silently (--reprob 2 erases every image) or fail at the first batch."""
    rules = (("--reprob", reprob, "lie in [0, 1]", lambda v: 0 <= v <= 1),
             ("--mixup", mixup, "be >= 0 (a Beta distribution's alpha; 0: off)", lambda v: v >= 0),
             ("--cutmix", cutmix, "be >= 0 (a Beta distribution's alpha; 0: off)", lambda v: v >= 0),
             ("--smoothing", smoothing, "lie in [0, 1)", lambda v: 0 <= v < 1))
    for name, value, rule, ok in rules:
        if value is not None and not ok(value):
            raise UserError(f"argument {name} must {rule}, got {value}")
    if aa not in (None, "", "none"):
        from timm.data import create_transform

        try:
            create_transform(32, is_training=True, auto_augment=aa)
        except Exception as exc:  # noqa: BLE001  (timm asserts on names it does not know)
            raise UserError(f"argument --aa: {aa!r} is not a timm auto-augment policy ({str(exc) or type(exc).__name__}); "
                            "e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, or none") from exc


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, said once: not where the help text names it already, not
    for switches (store_true / store_false) and not when it is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or "default" in text.lower()
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))):
            return text
        return super()._get_help_string(action)


def add_model_kwargs_arg(p: argparse.ArgumentParser, flag: str = "--model-kwargs", of: str = "") -> None:
    p.add_argument(flag, nargs="*", default=None, metavar="KEY=VALUE",
                   help=f"extra timm.create_model arguments{' for ' + of if of else ''}, e.g. img_size=384 "
                        "'depths=(2,2,6,2)' (like timm's train.py)")


def model_kwargs(items) -> dict:
    """['img_size=32', 'depths=(2,2)'] -> {'img_size': 32, 'depths': (2, 2)} (Python literals; other
    values stay strings)."""
    import ast

    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"argument --model-kwargs: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out
