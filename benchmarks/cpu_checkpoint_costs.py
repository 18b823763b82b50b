"""What the two reliability mechanisms that run during training cost, measured on the host (no GPU
is involved in either):

1. the SIGTERM stop vote: under torchrun `fit` all-reduces one int32 on a gloo group after every
   step. Timed here between WORLD processes on this machine (the single-node case: gloo over
   loopback), per call: median, p99, mean; blocking (engine.sigterm.stop_agreed, calls back to
   back: the round trip) and pipelined as fit runs it (StopVote.after_step: starts this step's
   vote, reads the last step's), with STEP_MS of idle host time between steps.
2. a save-logits shard checkpoint (tinyvit.store.ShardWriter, every 60 s by default): fsync of the
   records written since the last one plus the small progress file, timed for several amounts of
   records written in between, on the file system of --dir.

    python benchmarks/cpu_checkpoint_costs.py [--world 2] [--calls 5000] [--step-ms 2] [--mb 1 16 64] [--dir /tmp]
        [--markdown out.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from markdown_out import emit


def _vote_worker(rank: int, world: int, port: int, calls: int, step_ms: float, out) -> None:
    import torch.distributed as dist

    from vitfast.engine import sigterm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        group = sigterm.cpu_group()
        for _ in range(100):  # warm-up: connections, allocations
            sigterm.stop_agreed(world, group)
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            sigterm.stop_agreed(world, group)
            times.append(time.perf_counter() - t)
        # what fit calls: the pipelined vote, between steps of `step_ms` (a sleep: the step's host
        # time is the GPU's queue, the host idles)
        vote, piped = sigterm.StopVote(world, group), []
        for _ in range(calls // 10):
            time.sleep(step_ms / 1e3)
            t = time.perf_counter()
            vote.after_step()
            piped.append(time.perf_counter() - t)
        vote.settle()
        if rank == 0:
            out.put((times, piped))
    finally:
        dist.destroy_process_group()


def _summary(seconds: list[float]) -> dict:
    us = sorted(t * 1e6 for t in seconds)
    return {"median_us": statistics.median(us), "p99_us": us[int(0.99 * len(us))], "mean_us": statistics.fmean(us)}


def _result(out, procs, limit_s: float):
    """Rank 0's timings; a worker that died (an import error, a refused port) ends the wait at once
    with its exit code instead of leaving the others blocked in the vote until the limit."""
    import queue

    deadline = time.monotonic() + limit_s
    while True:
        try:
            return out.get(timeout=0.5)
        except queue.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            late = time.monotonic() > deadline
            if dead or late:
                for p in procs:
                    p.kill()
                why = (", ".join(f"rank {r} exited with {code}" for r, code in dead) if dead
                       else f"no result within {limit_s:.0f} s")
                raise SystemExit(f"cpu_checkpoint_costs: the vote workers failed: {why} (their errors are above)")


def vote_costs(world: int, calls: int, step_ms: float) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_vote_worker, args=(r, world, port, calls, step_ms, out)) for r in range(world)]
    for p in procs:
        p.start()
    times, piped = _result(out, procs, limit_s=600)
    for p in procs:
        p.join(timeout=60)
    return {"world": world, "calls": calls, "step_ms": step_ms, "blocking": _summary(times),
            "pipelined": _summary(piped), "pipelined_calls": len(piped)}


def checkpoint_costs(folder: str, sizes_mb: list[float], repeats: int = 3) -> list[dict]:
    from vitfast.tinyvit.store import ResumePoint, ShardWriter, StoreMeta, write_meta

    # ImageNet-1k's recipe: top-100 of 1,000 classes, compact encoding
    meta = StoreMeta(k=100, num_classes=1000, encoding="compact", dataset_size=1 << 30)
    root = os.path.join(folder, "store")
    write_meta(root, meta)
    batch = 256
    rng = np.random.default_rng(0)
    values = rng.dirichlet(np.ones(100), batch).astype(np.float32)
    indices = np.argsort(rng.random((batch, 1000)), axis=1)[:, :100].astype(np.int64)
    seeds = np.arange(batch, dtype=np.uint32)
    rows = []
    for mb in sizes_mb:
        per = max(1, round(mb * 2**20 / (batch * meta.record_bytes)))  # batches between checkpoints
        writer = ShardWriter(root, meta, 0, 0, 1, resume=ResumePoint({"bench": mb}, lambda b: np.arange(b * batch)),
                             checkpoint_seconds=None)
        written, times, write_s = 0, [], []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(per):
                writer.add(np.arange(written, written + batch), seeds, values, indices)
                written += batch
            write_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            writer._checkpoint()  # what the timer (or suspend) calls between batches
            times.append(time.perf_counter() - t)
        writer.suspend()
        os.remove(writer.path + ".tmp")
        os.remove(writer.path + ".tmp.progress")
        rows.append({"mb_between": per * batch * meta.record_bytes / 2**20, "batches_between": per,
                     "record_bytes": meta.record_bytes, "checkpoint_ms": [round(t * 1e3, 1) for t in times],
                     "write_ms": [round(t * 1e3, 1) for t in write_s]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--step-ms", type=float, default=2.0, help="host idle time between pipelined votes")
    ap.add_argument("--mb", type=float, nargs="+", default=[1, 16, 64])
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--markdown")
    a = ap.parse_args()
    vote = vote_costs(a.world, a.calls, a.step_ms)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        fs = subprocess.run(["stat", "-f", "-c", "%T", d], capture_output=True, text=True).stdout.strip()
        ckpt = checkpoint_costs(d, a.mb)
    import torch

    lines = [f"host: {os.cpu_count()} CPUs, torch {torch.__version__}, Python {sys.version.split()[0]}, "
             f"{time.strftime('%Y-%m-%d')}", "",
             f"stop vote (gloo all-reduce of one int32, {vote['world']} processes on this host), per call:", "",
             "| vote | calls | median, us | p99, us | mean, us |", "|---|---|---|---|---|",
             *(f"| {name} | {n} | {v['median_us']:.0f} | {v['p99_us']:.0f} | {v['mean_us']:.0f} |" for name, n, v in (
                 ("blocking (`stop_agreed`, back to back)", vote["calls"], vote["blocking"]),
                 (f"pipelined (`StopVote.after_step`, {vote['step_ms']:g} ms between)", vote["pipelined_calls"],
                  vote["pipelined"]))),
             "", f"shard checkpoint on {a.dir} ({fs or 'unknown file system'}), records of {ckpt[0]['record_bytes']} "
             "bytes (top-100 of 1,000, compact):", "",
             "| written since the last checkpoint | checkpoint (fsync + progress file), ms | writing it, ms |",
             "|---|---|---|"]
    for r in ckpt:
        lines.append(f"| {r['mb_between']:.1f} MB ({r['batches_between']} batches of 256) | "
                     f"{', '.join(map(str, r['checkpoint_ms']))} | {', '.join(map(str, r['write_ms']))} |")
    emit("\n".join(lines) + "\n", a.markdown, append=False)


if __name__ == "__main__":
    main()
