"""Same-run benchmark of every vitfast op against its PyTorch baselines.

Times each op and each baseline in one process (CUDA events, warm-up, median over repeats,
inputs rotated among several copies so that L2 cannot hold them), measures peak memory and the
device's copy bandwidth (for the memory floor), checks the issue's bars, and writes JSON plus a
markdown report (device, torch, CUDA, date).

    python benchmarks/run_gpu.py --json out.json --markdown benchmarks/RESULTS.md
    python benchmarks/run_gpu.py --device cpu --quick      # smoke test of this script
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys

import torch

import vitfast
from vitfast import sparse_soft_target_cross_entropy, topk_softmax
from vitfast.ops import dense_soft_target_cross_entropy
from vitfast.ops.dense_soft_target_ce import dense_soft_target_ce_with_grad
from vitfast.ops.reference import sparse_soft_target_dense
from vitfast.timing import peak_memory_mb, time_ms
from head_mix_cases import SHAPES as HEAD_MIX_SHAPES, bench_head_mix, head_mix_bars, head_mix_markdown
from window_attention_cases import SHAPES as WINDOW_SHAPES, bench_window_attention, window_bars, window_markdown

ROTATE = 4  # input copies cycled through, > L2 for the big cases


def rotating(make, n=ROTATE):
    """A zero-argument callable that returns the next of n independently built inputs."""
    pool = [make() for _ in range(n)]
    it = itertools.cycle(pool)
    return lambda: next(it)


def copy_bandwidth_gbs(device, quick) -> float:
    n = (2**24 if quick else 2**28)  # 64 MiB / 1 GiB of float32
    a = torch.randn(n, device=device)
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, 3, 10 if quick else 30)
    return 2 * n * 4 / (ms * 1e-3) / 1e9  # read + write


def maybe_compile(fn, enabled):
    return torch.compile(fn, dynamic=False) if enabled else None


def bench_topk(device, b, c, k, dtype, reps, use_compile, bw_gbs):
    nxt = rotating(lambda: (torch.randn(b, c, device=device) * 3).to(dtype))

    def ours():
        return topk_softmax(nxt(), k)

    def softmax_topk(x):  # the baseline the issue names (0.62 ms on the H100 for 1024x21841)
        return torch.softmax(x.float(), -1).topk(k)

    def topk_then_lse(x):  # the strongest eager alternative: select on logits, normalise k values
        v, i = x.topk(k)
        return (v.float() - torch.logsumexp(x.float(), -1, keepdim=True)).exp(), i

    compiled = maybe_compile(softmax_topk, use_compile)
    t = {"vitfast": time_ms(ours, device, 5, reps),
         "softmax(float)+topk": time_ms(lambda: softmax_topk(nxt()), device, 5, reps),
         "topk+logsumexp": time_ms(lambda: topk_then_lse(nxt()), device, 5, reps)}
    if compiled is not None:
        t["torch.compile(softmax+topk)"] = time_ms(lambda: compiled(nxt()), device, 3, reps)
    bytes_moved = b * c * torch.empty((), dtype=dtype).element_size() + b * k * 4
    return {"op": "topk_softmax", "shape": f"B{b} C{c} k{k}", "dtype": str(dtype).replace("torch.", ""),
            "times_ms": t, "floor_ms": bytes_moved / (bw_gbs * 1e9) * 1e3 if bw_gbs else None,
            "bytes": bytes_moved}


def bench_ce(device, b, c, k, dtype, reps, use_compile, bw_gbs):
    def make():
        v, i = topk_softmax(torch.randn(b, c, device=device) * 3, k)
        return (torch.randn(b, c, device=device) * 2).to(dtype), v, i

    nxt = rotating(make)

    def ours_fwd_bwd():
        x, v, i = nxt()
        x.requires_grad_()
        return torch.autograd.grad(sparse_soft_target_cross_entropy(x, v, i, c), x)

    def ours_fwd():
        x, v, i = nxt()
        return sparse_soft_target_cross_entropy(x, v, i, c)

    def dense_loss(x, v, i):  # scatter-to-dense + log_softmax + sum, in float32
        t = sparse_soft_target_dense(v, i, c, torch.float32)
        return -(t * torch.log_softmax(x.float(), -1)).sum(-1).mean()

    def dense_fwd_bwd(loss_fn):
        def run():
            x, v, i = nxt()
            x.requires_grad_()
            return torch.autograd.grad(loss_fn(x, v, i), x)
        return run

    t = {"vitfast": time_ms(ours_fwd_bwd, device, 5, reps),
         "dense target + log_softmax": time_ms(dense_fwd_bwd(dense_loss), device, 5, reps)}
    fwd = {"vitfast": time_ms(ours_fwd, device, 5, reps),
           "dense target + log_softmax": time_ms(lambda: dense_loss(*nxt()), device, 5, reps)}
    compiled = maybe_compile(dense_loss, use_compile)
    if compiled is not None:
        t["torch.compile(dense)"] = time_ms(dense_fwd_bwd(compiled), device, 3, reps)
    mem = {"vitfast": peak_memory_mb(ours_fwd_bwd, device),
           "dense target + log_softmax": peak_memory_mb(dense_fwd_bwd(dense_loss), device)}
    esize = torch.empty((), dtype=dtype).element_size()
    bytes_moved = 3 * b * c * esize  # forward read, backward read + write
    return {"op": "sparse_soft_target_ce fwd+bwd", "shape": f"B{b} C{c} k{k}", "dtype": str(dtype).replace("torch.", ""),
            "times_ms": t, "forward_ms": fwd, "peak_mem_mb": mem,
            "grad_mb": b * c * esize / 2**20, "fp32_bxc_mb": b * c * 4 / 2**20,
            "floor_ms": bytes_moved / (bw_gbs * 1e9) * 1e3 if bw_gbs else None, "bytes": bytes_moved}


def bench_dense_ce(device, rows, c, dtype, scales, reps, use_compile, bw_gbs, label):
    """Loss and gradient of a dense soft-target CE: the op (through autograd, and as MiniViT's
    relation losses call it: loss + gradient, no autograd) against the eager float32 form that
    MiniViT's chunked relation loss ran before (log_softmax, softmax, product, sum, its gradient),
    and torch.compile of it."""
    ss, ts = scales
    nxt = rotating(lambda: ((torch.randn(rows, c, device=device) * 3).to(dtype),
                            (torch.randn(rows, c, device=device) * 3).to(dtype)))

    def ours():
        x, t = nxt()
        x.requires_grad_()
        return torch.autograd.grad(dense_soft_target_cross_entropy(x, t, ss, ts, reduction="sum"), x)

    def ours_op():
        return dense_soft_target_ce_with_grad(*nxt(), ss, ts)

    def eager_loss(x, t):
        return -(torch.softmax(t.float() * ts, -1) * torch.log_softmax(x.float() * ss, -1)).sum()

    def eager(loss_fn):
        def run():
            x, t = nxt()
            x.requires_grad_()
            return torch.autograd.grad(loss_fn(x, t), x)
        return run

    t = {"vitfast": time_ms(ours, device, 5, reps), "vitfast (loss+grad op)": time_ms(ours_op, device, 5, reps),
         "eager float32 softmaxes": time_ms(eager(eager_loss), device, 5, reps)}
    compiled = maybe_compile(eager_loss, use_compile)
    if compiled is not None:
        t["torch.compile(eager)"] = time_ms(eager(compiled), device, 3, reps)
    mem = {"vitfast": peak_memory_mb(ours, device), "eager float32 softmaxes": peak_memory_mb(eager(eager_loss), device)}
    esize = torch.empty((), dtype=dtype).element_size()
    bytes_moved = 3 * rows * c * esize  # both sides read once, the gradient written once
    return {"op": "dense_soft_target_ce loss+grad", "shape": f"{label} R{rows} C{c}", "dtype": str(dtype).replace("torch.", ""),
            "times_ms": t, "peak_mem_mb": mem,
            "floor_ms": bytes_moved / (bw_gbs * 1e9) * 1e3 if bw_gbs else None, "bytes": bytes_moved}


def bench_covariance(device, n, m, dtype, reps):
    """covariance_update_ on n x m rows with means 100x the spread. "vitfast" is the default route
    (auto); on sm_80+ each CUDA route is timed too, with its error and peak memory."""
    from vitfast.ops import CovarianceAccumulator

    nxt = rotating(lambda: (torch.randn(n, m, device=device) + 100).to(dtype), n=2)
    out = torch.empty(m, m, device=device, dtype=torch.float32 if dtype == torch.float32 else dtype)
    routes = {"vitfast": "auto"}
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        routes.update({"vitfast split_gemm": "split_gemm", "vitfast tensor_core": "tensor_core"})

    def ours(method):
        acc = CovarianceAccumulator(m, device, method=method)
        return lambda: acc.update(nxt())

    def addmm_fp32():  # E[yy^T] by fp32 addmm with TF32 off (23 ms on the H100 for 65536x3072)
        y = nxt()
        torch.addmm(out, y.T, y, beta=0.0, out=out)

    tf32 = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    t, mem = {}, {}
    try:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
        for name, method in routes.items():
            t[name] = time_ms(ours(method), device, 2, reps)
            mem[name] = peak_memory_mb(ours(method), device)
        base = "addmm fp32 (TF32 off)" if dtype == torch.float32 else "cuBLAS Gram (same dtype)"
        t[base] = time_ms(addmm_fp32, device, 2, reps)
        mem[base] = peak_memory_mb(addmm_fp32, device)
        if dtype == torch.float32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            t["addmm TF32"] = time_ms(addmm_fp32, device, 2, reps)
    finally:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
    y = nxt()
    yd = y.double()
    ref = (yd - yd.mean(0)).T @ (yd - yd.mean(0)) / n
    errs = {}
    for name, method in routes.items():
        accu = CovarianceAccumulator(m, device, method=method)
        accu.update(y)
        errs[name] = ((accu.covariance() - ref).norm() / ref.norm()).item()
    return {"op": "covariance_update", "shape": f"n{n} m{m}", "dtype": str(dtype).replace("torch.", ""),
            "times_ms": t, "peak_mem_mb": mem, "rel_err_vs_fp64": errs["vitfast"], "rel_err_by_route": errs,
            "floor_ms": None, "bytes": n * m * y.element_size()}


# The bars: (op, shape, dtype, baseline, minimum speed-up).
BARS = [
    ("topk_softmax", "B1024 C21841 k100", "float16", "softmax(float)+topk", 10.0),
    ("topk_softmax", "B1024 C1000 k10", "float16", "softmax(float)+topk", 5.0),
    ("sparse_soft_target_ce fwd+bwd", "B1024 C21841 k100", "bfloat16", "dense target + log_softmax", 5.0),
    ("covariance_update", "n65536 m3072", "float32", "addmm fp32 (TF32 off)", 2.0),
    ("covariance_update", "n65536 m3072", "bfloat16", "cuBLAS Gram (same dtype)", 1.5),
]


def check_bars(cases):
    out = []
    for op, shape, dtype, base, need in BARS:
        for c in cases:
            if c["op"] == op and c["shape"] == shape and c["dtype"] == dtype:
                got = c["times_ms"][base] / c["times_ms"]["vitfast"]
                out.append({"what": f"{op} {shape} {dtype} vs {base}", "need": need, "got": got, "pass": got >= need})
        for c in cases:  # memory bar: no B x C float32 temporaries beyond the gradient itself
            if op.startswith("sparse") and c["op"] == op and c["shape"] == shape and c["dtype"] == dtype \
                    and c["peak_mem_mb"]["vitfast"] is not None:
                extra = c["peak_mem_mb"]["vitfast"] - c["grad_mb"]
                out.append({"what": f"{op} {shape} {dtype}: peak memory beyond the gradient (MB)",
                            "need": f"< {c['fp32_bxc_mb']:.1f} (one fp32 BxC)", "got": extra,
                            "pass": extra < c["fp32_bxc_mb"]})
    for c in cases:
        if c["op"] == "covariance_update" and c["dtype"] == "float32" and c["shape"] == "n65536 m3072":
            out.append({"what": "covariance_update fp32 n65536 m3072 (means 100x spread): rel err vs fp64",
                        "need": "<= 1e-5", "got": c["rel_err_vs_fp64"], "pass": c["rel_err_vs_fp64"] <= 1e-5})
    return out


def environment(device):
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "vitfast": vitfast.__version__, "build": vitfast.build_info()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["device"] = f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def markdown(report) -> str:
    env = report["env"]
    lines = [
        "# vitfast benchmark results",
        "",
        "Written by `benchmarks/run_gpu.py` (via `scripts/gpu_check.sh`); every ratio compares timings taken",
        "in the same run. Median of CUDA-event timings after warm-up, inputs rotated among "
        f"{ROTATE} copies.",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}, vitfast {env['vitfast']}",
        f"- date: {env['date']}",
        f"- measured copy bandwidth: {report['bandwidth_gbs']:.0f} GB/s (read + write), used for the floors",
        "",
        "## Bars",
        "",
        "| bar | needed | measured | |",
        "|---|---|---|---|",
    ]
    for b in report["bars"]:
        got = f"{b['got']:.2f}x" if isinstance(b["need"], float) else f"{b['got']:.3g}"
        need = f"{b['need']:g}x" if isinstance(b["need"], float) else b["need"]
        lines.append(f"| {b['what']} | {need} | {got} | {'PASS' if b['pass'] else 'FAIL'} |")
    lines += ["", "## Timings (ms)", "", "| op | shape | dtype | impl | ms | speed-up of vitfast | floor ms |",
              "|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        if c["op"] in ("window_attention", "head_mix_attention"):
            continue  # own tables below
        ours = c["times_ms"]["vitfast"]
        for impl, ms in c["times_ms"].items():
            speed = "" if impl == "vitfast" else f"{ms / ours:.2f}x"
            floor = f"{c['floor_ms']:.4f}" if impl == "vitfast" and c.get("floor_ms") else ""
            lines.append(f"| {c['op']} | {c['shape']} | {c['dtype']} | {impl} | {ms:.4f} | {speed} | {floor} |")
    lines += window_markdown(report["cases"])
    lines += head_mix_markdown(report["cases"])
    mem_cases = [c for c in report["cases"] if c["op"].startswith("sparse") and c.get("peak_mem_mb")
                 and c["peak_mem_mb"]["vitfast"] is not None]
    if mem_cases:
        lines += ["", "## Peak memory of forward + backward (MB above inputs)", "",
                  "| op | shape | dtype | vitfast | dense baseline | gradient itself | one fp32 BxC |", "|---|---|---|---|---|---|---|"]
        for c in mem_cases:
            m = c["peak_mem_mb"]
            lines.append(f"| {c['op']} | {c['shape']} | {c['dtype']} | {m['vitfast']:.1f} | "
                         f"{m['dense target + log_softmax']:.1f} | {c['grad_mb']:.1f} | {c['fp32_bxc_mb']:.1f} |")
    cov_cases = [c for c in report["cases"] if c["op"] == "covariance_update"]
    if cov_cases:
        lines += ["", "## covariance_update by route (rows with means 100x the spread)", "",
                  "| shape | dtype | route | ms | rel. error vs float64 | peak memory MB (above inputs) |",
                  "|---|---|---|---|---|---|"]
        for c in cov_cases:
            for impl, ms in c["times_ms"].items():
                err = c["rel_err_by_route"].get(impl)
                mem = c["peak_mem_mb"].get(impl)
                lines.append(f"| {c['shape']} | {c['dtype']} | {impl} | {ms:.3f} | "
                             f"{'' if err is None else f'{err:.2e}'} | {'' if mem is None else f'{mem:.0f}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (script smoke test)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--markdown", help="write the markdown report here (e.g. benchmarks/RESULTS.md)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("run_gpu.py: no CUDA device; use --device cpu --quick to smoke-test the script", file=sys.stderr)
        return 2
    reps = 5 if args.quick else 100
    use_compile = not args.no_compile and not args.quick
    scale = 8 if args.quick else 1  # quick mode shrinks the batch
    bw = copy_bandwidth_gbs(device, args.quick)
    cases = []
    for c, k in ((21841, 100), (1000, 10)):
        for dtype in ((torch.float16, torch.bfloat16, torch.float32) if c == 21841 else (torch.float16,)):
            cases.append(bench_topk(device, 1024 // scale, c, k, dtype, reps, use_compile, bw))
            print(json.dumps(cases[-1]["times_ms"]), cases[-1]["shape"], cases[-1]["dtype"], flush=True)
    for c, k in ((21841, 100), (1000, 10)):
        for dtype in ((torch.bfloat16, torch.float16, torch.float32) if c == 21841 else (torch.bfloat16,)):
            cases.append(bench_ce(device, 1024 // scale, c, k, dtype, reps, use_compile, bw))
            print(json.dumps(cases[-1]["times_ms"]), cases[-1]["shape"], cases[-1]["dtype"], flush=True)
    # MiniViT's relation rows (one chunk of Mini-DeiT-S's relations: 48 windows x 9 x 197 rows of
    # 197, bf16 products, scale 384^-1/2) and knowledge distillation against dense logits (T = 4)
    for rows, c, dtype, scales, label in ((48 * 9 * 197, 197, torch.bfloat16, (384 ** -0.5, 384 ** -0.5), "relations"),
                                          (1024, 1000, torch.bfloat16, (0.25, 0.25), "KD logits"),
                                          (1024, 21841, torch.float32, (0.25, 0.25), "KD logits")):
        cases.append(bench_dense_ce(device, rows // scale, c, dtype, scales, reps, use_compile, bw, label))
        print(json.dumps(cases[-1]["times_ms"]), cases[-1]["shape"], cases[-1]["dtype"], flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        n, m = (65536, 3072) if not args.quick else (4096, 256)
        cases.append(bench_covariance(device, n, m, dtype, max(3, reps // 5)))
        print(json.dumps(cases[-1]["times_ms"]), cases[-1]["shape"], cases[-1]["dtype"],
              "rel err", cases[-1]["rel_err_vs_fp64"], flush=True)
    for name in WINDOW_SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            cases.append(bench_window_attention(device, name, dtype, max(3, reps // 2), bw, args.quick))
            print(json.dumps(cases[-1]["times_ms"]), cases[-1]["shape"], cases[-1]["dtype"], flush=True)
    for name in HEAD_MIX_SHAPES:
        cases.append(bench_head_mix(device, name, torch.bfloat16, max(3, reps // 2), use_compile, args.quick))
        print(json.dumps(cases[-1]["times_ms"]), cases[-1]["shape"], cases[-1]["dtype"], flush=True)
    if args.quick:  # quick shapes are not the bars' shapes: relabel so the check still runs
        for case in cases:
            case["shape"] = case["shape"].replace(f"B{1024 // scale} ", "B1024 ").replace("n4096 m256", "n65536 m3072")
    report = {"env": environment(device), "bandwidth_gbs": bw, "cases": cases,
              "bars": check_bars(cases) + window_bars(cases) + head_mix_bars(cases),
              "quick": args.quick}
    text = markdown(report)
    if args.quick:
        text = text.replace("# vitfast benchmark results", "# vitfast benchmark results (QUICK SMOKE RUN: not the real shapes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
