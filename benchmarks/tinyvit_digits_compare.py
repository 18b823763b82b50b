"""Does distillation from the store beat training on labels? The embedded default (digits teacher
and data, the digits student), several seeds of the student's initial weights, same schedule and
augmentation (replayed from the store; mixup 0.4) for both arms. CPU, a few minutes per run.

    python benchmarks/tinyvit_digits_compare.py --seeds 0 1 2 --json out.json

Writes a markdown table (mean, per-seed held-out accuracy) to stdout and, with --json, the details.
Uses an existing store (--store) or writes one with the default save-logits settings.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

from vitfast.tinyvit.defaults import MIXUP, STUDENT, digits_student, digits_train_set, digits_transform
from vitfast.tinyvit.train import distill


def save_default_store(root: str, epochs: int) -> None:
    from vitfast.cli import main as vitfast_main

    vitfast_main(["tinyvit", "save-logits", "--out", root, "--epochs", str(epochs)])


def run_arm(store, labels_only, seed, epochs, batch_size):
    ds, eval_set = digits_train_set()
    torch.manual_seed(seed)
    student = digits_student()
    t0 = time.time()
    res = distill(student, ds, digits_transform(), None if labels_only else store, epochs, batch_size=batch_size,
                  eval_set=eval_set, labels_only=labels_only, base_seed=0, mixup_args=MIXUP, progress=False,
                  log=lambda *a: None)
    return {"accuracy": res["eval_accuracy"], "seconds": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", help="existing store of the embedded default (else one is written)")
    ap.add_argument("--store-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=60, help="student epochs (the CLI's default)")
    ap.add_argument("--batch-size", type=int, default=64, help="the CLI's default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    tmp = None
    store = args.store
    if store is None:
        tmp = tempfile.TemporaryDirectory()
        store = tmp.name + "/store"
        save_default_store(store, args.store_epochs)
    runs = {"distilled": {}, "labels only": {}}
    for seed in args.seeds:
        for arm in runs:
            runs[arm][seed] = run_arm(store, arm == "labels only", seed, args.epochs, args.batch_size)
            print(arm, "seed", seed, json.dumps(runs[arm][seed]), file=sys.stderr, flush=True)
    lines = [f"Student {STUDENT} on the digits, {args.epochs} epochs, batch {args.batch_size}, store of "
             f"{args.store_epochs} epochs (top-5, mixup {MIXUP['mixup_alpha']}); held-out accuracy (359 images):", "",
             "| arm | mean | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
             "|---|---|" + "---|" * len(args.seeds)]
    for arm, by_seed in runs.items():
        accs = [by_seed[s]["accuracy"] for s in args.seeds]
        lines.append(f"| {arm} | {100 * statistics.mean(accs):.2f}% | " +
                     " | ".join(f"{100 * a:.2f}%" for a in accs) + " |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "args": vars(args)}, f, indent=2)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
