"""The `vitfast` command line (also `python -m vitfast`): the three pipelines (lowrank, tinyvit,
minivit), the build report (info), a kernel demo and the embedded teacher's training."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch

from . import _ext


def _gpu_lines() -> list[str]:
    if not torch.cuda.is_available():
        return ["GPU: none visible"]
    lines = []
    compiled = _ext.build_info().get("cuda_archs", "")
    archs = [a.strip() for a in compiled.replace(",", ";").split(";") if a.strip()]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        cc = float(f"{p.major}.{p.minor}")
        # "9.0a" / "10.0f": arch-specific / family code for that same compute capability
        sass = any(a.split("+")[0].rstrip("af") == f"{p.major}.{p.minor}" for a in archs)
        ptx = any(a.endswith("+PTX") and float(a.split("+")[0].rstrip("af")) <= cc for a in archs)
        note = "native code" if sass else ("PTX, JIT-compiled at first use" if ptx else "NOT COVERED by this build")
        lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB ({note})")
    return lines


def cmd_info(args) -> int:
    from . import __version__
    from .ops import OPS

    info = _ext.build_info()
    report = {
        "vitfast": __version__,
        "build": info,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "ops": {name: {dev: ("native" if _ext.native(torch.device(dev)) else "reference fallback")
                       for dev in ("cpu", "cuda")} for name in OPS},
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"vitfast {__version__}")
    if info["loaded"]:
        cuda = (f"yes (archs {info['cuda_archs']}, CUDA runtime {info['cuda_runtime_version']})"
                if info["cuda"] else "no (CPU-only build)")
        print(f"extension: vitfast._C loaded, built against torch {info['torch_version']} with {info['compiler']}")
        print(f"CUDA kernels: {cuda}")
    else:
        print(f"extension: NOT loaded ({info['error']}); every op runs its PyTorch reference")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    for line in _gpu_lines():
        print(line)
    print("ops:")
    for name, where in report["ops"].items():
        print(f"  {name:<36} cpu: {where['cpu']:<20} cuda: {where['cuda']}")
    return 0


def _version_line() -> str:
    from . import __version__

    info = _ext.build_info()
    if not info["loaded"]:
        ext = "extension not loaded: PyTorch reference ops"
    else:
        ext = f"extension built for torch {info['torch_version']}, " + (
            f"CUDA kernels for {info['cuda_archs']}" if info["cuda"] else "CPU only")
    return f"vitfast {__version__} (torch {torch.__version__}; {ext})"


class _VersionAction(argparse.Action):
    """--version: one unwrapped line (argparse's version action wraps it at the terminal width)."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version_line())
        parser.exit()


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_train_teacher(args) -> int:
    from .models.train_teacher import train_teacher

    result = train_teacher(epochs=args.epochs, lr=args.lr, seed=args.seed, out=args.out,
                           label_smoothing=args.label_smoothing)
    print(f"saved {result['out']}: held-out accuracy {result['held_out_accuracy']:.4f}, "
          f"train accuracy {result['train_accuracy']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitfast", description=__doc__)
    parser.add_argument("--version", action=_VersionAction, help="vitfast, torch and extension versions, one line "
                        "(details: vitfast info)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="build, torch, GPU and which ops run native kernels")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="TinyViT-style logit compression + sparse distillation loss, checked and timed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=21841, help="21841 = ImageNet-21k")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    from .models.digits_vit import ASSET

    p = sub.add_parser("train-teacher", help="train the embedded digits ViT teacher (reproducible, CPU, minutes)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--out", "--output", dest="out", default="digits_vit.safetensors",
                   help=f"where to write the weights (the shipped teacher is {ASSET}: write there only on purpose)")
    p.set_defaults(func=cmd_train_teacher)
    from .lowrank.cli import add_parser as add_lowrank

    add_lowrank(sub)
    from .tinyvit.cli import add_parser as add_tinyvit

    add_tinyvit(sub)
    from .minivit.cli import add_parser as add_minivit

    add_minivit(sub)
    return parser


def _user_message(exc: BaseException) -> str:
    """One readable message, also for a UserError re-raised from a data-loader worker (whose text
    carries the worker's traceback: keep its last line)."""
    msg = str(exc)
    if "Original Traceback" in msg:
        last = [line for line in msg.strip().splitlines() if line.strip()][-1]
        msg = last.split("UserError: ", 1)[-1]
    return msg


def _command_parser(parser, argv):
    """The (sub)parser of the command named in argv ("lowrank", "tinyvit distill", ...) and the
    arguments after its name: --config FILE.yaml fills that parser's defaults."""
    rest = list(argv)
    while rest and parser._subparsers is not None:
        choices = parser._subparsers._group_actions[0].choices
        if rest[0] not in choices:
            break
        parser, rest = choices[rest[0]], rest[1:]
    return parser, rest


def main(argv: list[str] | None = None) -> int:
    from .engine.cli_args import apply_config_file
    from .engine.run import abandon_unsaved_runs, begin_command, dropped_runs, release_runs, resumable_runs
    from .errors import UserError

    from .engine import sigterm

    begin_command()
    installed = sigterm.install()  # SIGTERM (a scheduler's stop): saved where training can, then one line
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        command, rest = _command_parser(parser, argv)
        if command is not parser:
            apply_config_file(command, rest)
        args = parser.parse_args(argv)
        from .progress import check_environment

        check_environment()  # a bad VITFAST_PROGRESS* fails now, not after the first expensive stage
        return args.func(args)
    except UserError as exc:
        abandon_unsaved_runs()
        print(f"vitfast: {_user_message(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a UserError raised inside a DataLoader worker comes back as this
        if "UserError" in str(exc):
            abandon_unsaved_runs()
            print(f"vitfast: {_user_message(exc)}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: one line instead of a traceback from wherever the run was
        from .engine.folder_lock import global_rank

        terminated = isinstance(exc, sigterm.Terminated)
        if installed:  # stopping already: a repeated SIGTERM (torchrun's agent relays the scheduler's) is not news
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        abandon_unsaved_runs()
        runs = resumable_runs()
        if runs:
            where = f"; the same command resumes from what was saved in '{os.path.commonpath(runs)}'"
        elif dropped_runs():
            where = "; nothing was saved (the run record is dropped: the command may change)"
        else:  # a command without a run record (save-logits keeps its finished shards, inspect, demo)
            where = ""
        told = exc.where if terminated and (runs or not dropped_runs()) else ""  # not for a dropped run
        what = ("stopped by SIGTERM" + (f" ({told})" if told else "")) if terminated else "interrupted"
        if global_rank() == 0:  # under torchrun every rank gets the signal: one line, from rank 0
            print(f"{chr(10) if sys.stderr.isatty() and not terminated else ''}vitfast: {what}{where}", file=sys.stderr)
        return sigterm.EXIT_STATUS if terminated else 130
    finally:  # the output folders this command locked are free for another process
        release_runs()
        if installed:
            sigterm.uninstall()


if __name__ == "__main__":
    sys.exit(main())
