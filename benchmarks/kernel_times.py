"""Where each op's time goes on the GPU: the summed device time of its kernels (torch.profiler)
against its wall time per call, for every case of benchmarks/ncu_cases.py. A wall time far above
the kernel time is host overhead (Python, dispatch, allocation), not kernel speed: the host side's
own split (CPU self time per operator and Python function, top 8 per case) goes to the JSON and,
for cases whose wall time is over twice their kernel time, to the output.

    python benchmarks/kernel_times.py [--reps 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from ncu_cases import cases


def measure(fn, reps):
    """(wall ms per call, {kernel name: device ms per call}, {host op: CPU self ms per call}) over
    `reps` calls after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / reps * 1e3
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=False) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels, host = {}, {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None)
        if t is None:
            t = e.cuda_time_total
        if t and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key] = kernels.get(e.key, 0.0) + t / 1e3 / reps
        elif e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total and \
                e.key != "cudaDeviceSynchronize":
            host[e.key] = host.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / reps
    host = dict(sorted(host.items(), key=lambda kv: -kv[1])[:8])
    return wall, kernels, host


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_times.py: needs a CUDA device", file=sys.stderr)
        return 2
    results = {}
    print("| case | wall ms/call | kernels ms/call | top kernels (ms/call) |")
    print("|---|---|---|---|")
    for name, fn in cases(torch.device("cuda"), small=False).items():
        wall, kernels, host = measure(fn, args.reps)
        total = sum(kernels.values())
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:4]
        results[name] = {"wall_ms": wall, "kernel_ms": total, "kernels": kernels, "host_self_ms": host}
        tops = "; ".join(f"{k[:60]} {v:.4f}" for k, v in top)
        print(f"| {name} | {wall:.4f} | {total:.4f} | {tops} |", flush=True)
        if wall > 2 * total:
            hosts = "; ".join(f"{k[:50]} {v:.4f}" for k, v in host.items())
            print(f"|   host-bound: CPU self ms/call | | | {hosts} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
