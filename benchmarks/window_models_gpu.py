"""End-to-end training and inference of timm Swin / TinyViT (and CaiT: --models cait_s24_224) with and without vitfast.patch, in one
run: bs 128, 224 x 224, bf16 autocast, AdamW, cross-entropy on random labels (random weights and
images: the shapes are the real ones).

Variants per model: unpatched eager, patched eager, unpatched torch.compile, patched
torch.compile. Reports train and inference images/s, peak memory of a train step, and the issue's
bars (patched+compiled >= 1.25x compiled for tiny_vit_21m, >= 1.15x for swin_tiny; patched eager
>= 1.5x eager; peak memory no higher than unpatched).

    python benchmarks/window_models_gpu.py --json models.json --append-markdown benchmarks/RESULTS.md
    python benchmarks/window_models_gpu.py --device cpu --quick      # smoke test of this script
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import timm
import torch
import torch.nn.functional as F

import vitfast
from vitfast.timing import peak_memory_mb, time_ms
from markdown_out import emit, exit_on_sigterm

MODELS = ("swin_tiny_patch4_window7_224", "tiny_vit_21m_224")
# patched+compiled vs compiled: window attention (issue 3), CaiT talking heads (issue 12)
COMPILED_BAR = {"swin_tiny_patch4_window7_224": 1.15, "tiny_vit_21m_224": 1.25, "cait_s24_224": 1.3}
EAGER_BAR = {"swin_tiny_patch4_window7_224": 1.5, "tiny_vit_21m_224": 1.5}  # patched eager vs eager


VARIANTS = ("eager", "patched", "compiled", "patched+compiled", "patched(sdpa)+compiled", "patched(fused)+compiled")


def variant_models(name, device, use_compile, only=None):
    """The variants of one model, made one at a time (each a copy of the same random weights), in
    `only`'s order when given; compiled ones only with use_compile, the explicit head_mix routes only
    for CaiT (talking heads: "auto" is sdpa there)."""
    base = timm.create_model(name).to(device)
    makers = {"eager": lambda: base, "patched": lambda: vitfast.patch(copy.deepcopy(base))}
    if use_compile:
        makers["compiled"] = lambda: torch.compile(copy.deepcopy(base))
        makers["patched+compiled"] = lambda: torch.compile(vitfast.patch(copy.deepcopy(base)))
        if name.startswith("cait_"):
            for impl in ("sdpa", "fused"):
                makers[f"patched({impl})+compiled"] = (
                    lambda impl=impl: torch.compile(vitfast.patch(copy.deepcopy(base), head_mix_impl=impl)))
    for variant in (only if only is not None else VARIANTS):
        if variant in makers:
            yield variant, makers[variant]()


def top_ops(step, device, n: int, steps: int = 2) -> list[dict]:
    """Where a step's time goes: the n operators / kernels with the most self time (device time on
    a GPU, CPU time otherwise) over `steps` profiled steps, per step -- so that a missed bar says
    which part of the model to look at (the depth-wise convolution, the attention, the optimiser)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, field, 0) > 0]
    total = sum(getattr(e, field) for e in events)
    events.sort(key=lambda e: getattr(e, field), reverse=True)
    return [{"name": e.key, "ms_per_step": getattr(e, field) / 1e3 / steps, "calls_per_step": e.count / steps,
             "share": getattr(e, field) / total} for e in events[:n]]


def top_ops_markdown(title: str, ops: list[dict]) -> list[str]:
    lines = ["", f"{title}: the operators with the most self time of a train step (torch.profiler)", "",
             "| operator / kernel | ms per step | calls per step | share |", "|---|---|---|---|"]
    for o in ops:
        name = o["name"] if len(o["name"]) <= 90 else o["name"][:87] + "..."
        lines.append(f"| `{name.replace('|', '/')}` | {o['ms_per_step']:.2f} | {o['calls_per_step']:g} "
                     f"| {100 * o['share']:.1f}% |")
    return lines


def measure(model, device, batch, size, reps, amp_dtype, infer=True, profile_top=0):
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=amp_dtype)

    def train_step():
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step():
        with torch.no_grad(), autocast:
            model(x)

    model.train()
    t0 = time.perf_counter()
    train_step()  # compiles, if compiled
    first_s = time.perf_counter() - t0
    train_ms = time_ms(train_step, device, 3, reps)
    mem = peak_memory_mb(train_step, device)
    out = {"train_img_s": batch / train_ms * 1e3, "train_ms": train_ms, "peak_train_mb": mem, "first_step_s": first_s}
    if profile_top:
        out["top_ops"] = top_ops(train_step, device, profile_top)
    if infer:  # a compiled model would compile again for eval mode + no_grad
        model.eval()
        infer_step()
        infer_ms = time_ms(infer_step, device, 3, reps)
        out.update(infer_img_s=batch / infer_ms * 1e3, infer_ms=infer_ms)
    return out


def bars(results):
    out = []
    for name, r in results.items():
        if "patched" in r and "eager" in r and name in EAGER_BAR:
            got = r["patched"]["train_img_s"] / r["eager"]["train_img_s"]
            out.append({"what": f"{name} train: patched eager vs eager", "need": EAGER_BAR[name], "got": got,
                        "pass": got >= EAGER_BAR[name]})
        for fused in ("patched+compiled", "patched(sdpa)+compiled"):
            if fused in r and "compiled" in r and name in COMPILED_BAR:
                need = COMPILED_BAR[name]
                got = r[fused]["train_img_s"] / r["compiled"]["train_img_s"]
                out.append({"what": f"{name} train: {fused} vs compiled", "need": need, "got": got,
                            "pass": got >= need})
        for plain, fused in (("eager", "patched"), ("compiled", "patched+compiled"),
                             ("compiled", "patched(sdpa)+compiled")):
            if fused in r and r[fused]["peak_train_mb"] is not None:
                a, b = r[plain]["peak_train_mb"], r[fused]["peak_train_mb"]
                out.append({"what": f"{name} peak train memory {fused} vs {plain} (MB)", "need": f"<= {a:.0f}",
                            "got": b, "pass": b <= a})
    return out


def markdown(report) -> str:
    lines = ["", "## Models end to end (`benchmarks/window_models_gpu.py`)", "",
             f"bs {report['batch']}, {report['size']} x {report['size']}, bf16 autocast, AdamW; "
             f"{report['device']}, torch {report['torch']}, timm {report['timm']}, {report['date']}"
             + ("" if report["complete"] else "; **cut short** (time limit): what is not listed was not measured"), "",
             "| model | variant | train img/s | infer img/s | peak train MB | first step s |", "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        for v, m in r.items():
            mem = "" if m["peak_train_mb"] is None else f"{m['peak_train_mb']:.0f}"
            infer = f"{m['infer_img_s']:.0f}" if "infer_img_s" in m else "not measured"
            lines.append(f"| {name} | {v} | {m['train_img_s']:.0f} | {infer} | {mem} | {m['first_step_s']:.1f} |")
    for name, r in report["results"].items():
        for v, m in r.items():
            if m.get("top_ops"):
                lines += top_ops_markdown(f"{name}, {v}", m["top_ops"])
    lines += ["", "| bar | needed | measured | |", "|---|---|---|---|"]
    for b in report["bars"]:
        need = f"{b['need']:g}x" if isinstance(b["need"], float) else b["need"]
        got = f"{b['got']:.2f}x" if isinstance(b["need"], float) else f"{b['got']:.0f}"
        lines.append(f"| {b['what']} | {need} | {got} | {'PASS' if b['pass'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="bs 2, 64 x 64, few repeats, no compile (smoke test)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, metavar="VARIANT",
                    help=f"which variants, in this order (default: all that apply: {', '.join(VARIANTS)})")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compiled-infer", action="store_true",
                    help="also time inference of the compiled variants (a second compile each)")
    ap.add_argument("--profile-top", type=int, default=0, metavar="N",
                    help="also profile two train steps of each variant and report its N costliest operators")
    ap.add_argument("--json")
    ap.add_argument("--append-markdown")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("window_models_gpu.py: no CUDA device; use --device cpu --quick", file=sys.stderr)
        return 2
    batch, size, reps = (2, 224, 2) if args.quick else (128, 224, args.reps)
    use_compile = not (args.quick or args.no_compile)
    amp = torch.bfloat16
    results = {}

    def write(final):  # after every variant: a step killed by its time limit keeps what it measured
        report = {"results": results, "bars": bars(results), "batch": batch, "size": size,
                  "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                  "torch": torch.__version__, "timm": timm.__version__,
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
                  "complete": final}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        return report

    exit_on_sigterm()
    done = False
    try:
        for name in args.models:
            results[name] = {}
            for variant, model in variant_models(name, device, use_compile, args.variants):
                infer = args.compiled_infer or "compiled" not in variant
                results[name][variant] = measure(model, device, batch, size, reps, amp, infer, args.profile_top)
                print(name, variant, json.dumps(results[name][variant]), flush=True)
                write(False)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        done = True
    finally:  # also when the step's time limit strikes: the report of what was measured
        emit(markdown(write(done)), args.append_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
