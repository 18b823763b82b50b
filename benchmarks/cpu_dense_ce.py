"""The dense soft-target CE and MiniViT's relation losses on the CPU, in one run: what the NOTES'
"Relation losses fused" section quotes for the 2-core machine.

* the op on the relation rows of one Mini-DeiT-S layer pair at bs 2 (2 windows x 9 x 591 rows of
  197, float32), with and without the gradient, against the eager float32 form the chunked
  relation loss runs (log_softmax, softmax, product, sum, softmax - target), on 1 and 2 threads;
* the attention-relation losses alone (6 layer pairs of (2, 197, 3 x 384) qkv, forward + backward):
  fused vs chunked (eager softmaxes) vs autograd.

    python benchmarks/cpu_dense_ce.py [--reps 20] [--json out.json]
    python benchmarks/cpu_dense_ce.py --quick        # smoke test of this script
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vitfast.minivit.distill import attention_relation_loss
from vitfast.minivit.relations import attention_relation_loss_lean
from vitfast.ops.dense_soft_target_ce import dense_soft_target_ce_with_grad


def ms_per_call(fn, reps: int) -> float:
    """Median over 3 rounds of the mean wall time of `reps` calls, after 2 warm-up calls."""
    for _ in range(2):
        fn()
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t0) / reps * 1e3)
    return statistics.median(rounds)


def op_rows(rows: int, cols: int, reps: int) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(rows, cols), torch.randn(rows, cols)
    scale = 384 ** -0.5

    def eager():
        ls = F.log_softmax(x * scale, -1)
        pt = F.softmax(y * scale, -1)
        loss = -(pt * ls).sum(-1)
        return loss, ls.exp_().sub_(pt).mul_(scale)

    out = {}
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        out[f"{n} thread(s)"] = {
            "vitfast loss+grad": ms_per_call(lambda: dense_soft_target_ce_with_grad(x, y, scale, scale), reps),
            "vitfast loss only": ms_per_call(lambda: dense_soft_target_ce_with_grad(x, y, scale, scale, False), reps),
            "eager float32 loss+grad": ms_per_call(eager, reps)}
    torch.set_num_threads(threads)
    return out


def relation_losses(batch: int, pairs: int, reps: int, width: int = 384, tokens: int = 197) -> dict:
    torch.manual_seed(0)
    sq = [torch.randn(batch, tokens, 3 * width, requires_grad=True) for _ in range(pairs)]
    tq = [torch.randn(batch, tokens, 3 * width) for _ in range(pairs)]
    impls = {"fused": lambda a, b: attention_relation_loss_lean(a, b, 1, fused=True),
             "chunked": lambda a, b: attention_relation_loss_lean(a, b, 1, fused=False),
             "autograd": lambda a, b: attention_relation_loss(a, b, 1)}
    out = {}
    for name, fn in impls.items():
        def step():
            torch.autograd.grad(sum(fn(a, b) for a, b in zip(sq, tq)) / pairs, sq)
        out[name] = ms_per_call(step, reps)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats (smoke test)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    reps = 2 if args.quick else args.reps
    rows = 2 * 9 * 591 if not args.quick else 9 * 49
    cols = 197 if not args.quick else 49
    report = {"op_rows": {"rows": rows, "cols": cols, "ms": op_rows(rows, cols, reps)},
              "relation_losses_ms": relation_losses(1 if args.quick else 2, 2 if args.quick else 6,
                                                    max(2, reps // 4), tokens=49 if args.quick else 197),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
