"""Host cost per call of each vitfast op (forward + backward where it has one) at tiny sizes, where
the kernels take no time and what is left is Python, dispatch, autograd and allocation -- beside
the PyTorch op a user would otherwise call, in the same run. On CUDA the GPU idles whenever a call
costs more on the host than its kernels take (the first H100 run: the soft-target CE at 0.35 ms of
host time per step against 0.096 ms of kernels).

    python benchmarks/host_overhead.py [--device cpu|cuda] [--reps 2000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import vitfast


def per_call_us(fn, device, reps: int) -> float:
    """Median over 5 rounds of the mean wall time per call (host clock; synchronised on CUDA)."""
    for _ in range(max(10, reps // 10)):
        fn()
    rounds = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rounds.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(rounds)


def cases(device):
    x = torch.randn(4, 16, device=device, requires_grad=True)
    v = torch.rand(4, 3, device=device)
    i = torch.stack([torch.randperm(16)[:3] for _ in range(4)]).to(device)
    qkv = torch.randn(2, 16, 3 * 2 * 8, device=device, requires_grad=True)
    eye = torch.eye(2, device=device, requires_grad=True)

    def sdpa(t):
        q, k, vv = t.reshape(2, 16, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, vv)

    return {
        "sparse_soft_target_ce fwd+bwd": (
            lambda: torch.autograd.grad(vitfast.sparse_soft_target_cross_entropy(x, v, i), x),
            lambda: torch.autograd.grad(F.cross_entropy(x, i[:, 0]), x), "F.cross_entropy"),
        "topk_softmax": (lambda: vitfast.topk_softmax(x.detach(), 3),
                         lambda: torch.topk(x.detach().softmax(-1), 3), "softmax + torch.topk"),
        "window_attention fwd+bwd": (lambda: torch.autograd.grad(vitfast.window_attention(qkv, 2, 8).sum(), qkv),
                                     lambda: torch.autograd.grad(sdpa(qkv).sum(), qkv), "SDPA"),
        "head_mix_attention fwd+bwd": (
            lambda: torch.autograd.grad(vitfast.head_mix_attention(qkv, 2, 8, pre_mix=eye, post_mix=eye).sum(),
                                        (qkv, eye)),
            lambda: torch.autograd.grad(sdpa(qkv).sum(), qkv), "SDPA (no mixes)"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: the host cost, not the parallel kernels)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("host_overhead.py: no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results = {}
    print(f"| op ({device.type}, tiny sizes) | vitfast us/call | baseline | baseline us/call |\n|---|---|---|---|")
    for name, (ours, base, label) in cases(device).items():
        a, b = per_call_us(ours, device, args.reps), per_call_us(base, device, args.reps)
        results[name] = {"vitfast_us": a, "baseline": label, "baseline_us": b}
        print(f"| {name} | {a:.1f} | {label} | {b:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
