"""MiniViT training steps on the GPU against their peers, in one run (bs 128, 224 x 224, bf16
autocast, AdamW, random weights and labels: the shapes are the real ones):

* deit_small_patch16_224 compiled vs Mini-DeiT-S (share 2) compiled -- bar: >= 0.8x images/s
* Mini-DeiT-S compiled, fused head-mixing attention vs the same Mini model with its attention in
  PyTorch ops (eager talking heads), compiled -- bar: >= 1.5x
* swin_tiny_patch4_window7_224 compiled vs Mini-Swin-T (share per stage) compiled -- bar: >= 1.1x
* each Mini model again with head_mix_attention's impl="sdpa" route ("sdpa route"), against the
  same bars: the faster route becomes the default

    python benchmarks/minivit_gpu.py --json minivit.json --append-markdown benchmarks/RESULTS.md
    python benchmarks/minivit_gpu.py --models deit_small_patch16_224 "mini_deit_small (fused)"  # a subset, in order
    python benchmarks/minivit_gpu.py --models "mini_deit_small (eager talking heads)" --previous minivit.json
    python benchmarks/minivit_gpu.py --device cpu --quick        # smoke test of this script

--profile-top N adds each model's N costliest operators of a train step (torch.profiler), so that a
missed bar points at its cause.

--previous adds the results of an earlier run on the same GPU (its JSON) to this run's bars, so the
bars can be split over time-limited steps (scripts/gpu_check.sh bars / bars2).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import timm
import torch

import vitfast.models  # noqa: F401  (mini_* names)
from vitfast.minivit import mini_blocks
from window_models_gpu import measure, top_ops_markdown
from markdown_out import emit, exit_on_sigterm

MODELS = ("deit_small_patch16_224", "mini_deit_small (fused)", "mini_deit_small (eager talking heads)",
          "swin_tiny_patch4_window7_224", "mini_swin_tiny (fused)", "mini_deit_small (sdpa route)",
          "mini_swin_tiny (sdpa route)")
BARS = [("mini_deit_small (fused)", "deit_small_patch16_224", 0.8),
        ("mini_deit_small (fused)", "mini_deit_small (eager talking heads)", 1.5),
        ("mini_swin_tiny (fused)", "swin_tiny_patch4_window7_224", 1.1),
        ("mini_deit_small (sdpa route)", "deit_small_patch16_224", 0.8),
        ("mini_deit_small (sdpa route)", "mini_deit_small (eager talking heads)", 1.5),
        ("mini_swin_tiny (sdpa route)", "swin_tiny_patch4_window7_224", 1.1)]


def build(name, device):
    if name.startswith("mini_"):
        base = name.split(" ")[0] + ("_patch16_224" if "deit" in name else "_patch4_window7_224")
        model = timm.create_model(base)
        for b in mini_blocks(model):
            b.eager = "eager" in name
            b.head_mix_impl = "sdpa" if "sdpa" in name else "fused"
        return model.to(device)
    return timm.create_model(name).to(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="bs 2, no compile, 2 repeats (smoke test)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME",
                    help=f"which to measure, in this order (default: all: {', '.join(MODELS)})")
    ap.add_argument("--profile-top", type=int, default=0, metavar="N",
                    help="also profile two train steps of each model and report its N costliest operators")
    ap.add_argument("--previous", help="JSON of an earlier run of this script on the same GPU: its results join the bars")
    ap.add_argument("--json")
    ap.add_argument("--append-markdown")
    args = ap.parse_args(argv)
    unknown = [n for n in args.models if n not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("minivit_gpu.py: no CUDA device; use --device cpu --quick", file=sys.stderr)
        return 2
    batch, reps = (2, 2) if args.quick else (128, args.reps)
    results, earlier = {}, set()
    if args.previous:
        with open(args.previous) as f:
            prev = json.load(f)
        if prev.get("compiled") != (not args.quick):
            ap.error(f"--previous {args.previous}: measured {'with' if prev.get('compiled') else 'without'} "
                     "torch.compile, unlike this run")
        earlier = {n for n in prev["results"] if n not in args.models}
        results.update({n: prev["results"][n] for n in earlier})

    def write():
        rows = {}
        for a, b, need in BARS:
            if a in results and b in results:
                got = results[a]["train_img_s"] / results[b]["train_img_s"]
                rows[f"{a} vs {b}"] = {"need": need, "got": got, "pass": got >= need}
        report = {"results": results, "bars": rows, "device": torch.cuda.get_device_name() if device.type == "cuda"
                  else "CPU", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "compiled": not args.quick}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return report

    exit_on_sigterm()
    done = False
    try:
        for name in args.models:
            model = build(name, device)
            if not args.quick:
                model = torch.compile(model)
            results[name] = measure(model, device, batch, 224, reps, torch.bfloat16, infer=False,
                                    profile_top=args.profile_top)
            results[name]["params"] = sum(p.numel() for p in model.parameters())
            print(name, json.dumps(results[name]), flush=True)
            write()
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        done = True
    finally:  # also when the step's time limit strikes: the report of what was measured
        emit(markdown(write(), batch, args.quick, earlier, done), args.append_markdown)
    return 0


def markdown(report, batch, quick, earlier, done) -> str:
    lines = ["", "## MiniViT training steps (`benchmarks/minivit_gpu.py`)", "",
             f"bs {batch}, 224 x 224, bf16 autocast, AdamW, {'torch.compile' if not quick else 'eager'}; "
             f"{report['device']}, torch {report['torch']}, {report['date']}"
             + ("" if done else "; **cut short** (time limit): the models not listed were not measured"), "",
             "| model | params | train img/s | peak train MB |", "|---|---|---|---|"]
    for name, r in report["results"].items():
        mem = "" if r["peak_train_mb"] is None else f"{r['peak_train_mb']:.0f}"
        where = " (earlier run, --previous)" if name in earlier else ""
        lines.append(f"| {name}{where} | {r['params'] / 1e6:.2f} M | {r['train_img_s']:.0f} | {mem} |")
    for name, r in report["results"].items():
        if r.get("top_ops"):
            lines += top_ops_markdown(name, r["top_ops"])
    lines += ["", "| bar | needed | measured | |", "|---|---|---|---|"]
    for what, b in report["bars"].items():
        lines.append(f"| {what} | {b['need']:g}x | {b['got']:.2f}x | {'PASS' if b['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
