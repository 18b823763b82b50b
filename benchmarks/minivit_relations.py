"""The relation losses' share of a MiniViT distillation step (issue 13: fuse them if above 10%).

One training step of the `vitfast minivit` pipeline's own loss (`vitfast.minivit.pipeline._loss_fn`):
Mini-DeiT-S (deit_small_patch16_224 multiplexed, sharing every 2 layers) distilled from DeiT-S at
the default layer pairs, AdamW, bf16 autocast on CUDA; eager like the pipeline's default. Three
variants, in one run:

* predictions only (soft cross-entropy against the teacher's logits; the teacher still runs);
* + attention relations (MiniLMv2: 9 q/k/v relation pairs per layer pair);
* + hidden relations (the full method, the pipeline's default weights);
* the full method again with --relation-impl chunked (eager float32 softmaxes per chunk of
  relations) and with --relation-impl autograd (the direct formulas, their (B, heads, N, N)
  relations kept for the backward) instead of the default fused one (the dense soft-target CE
  kernel on every relation row).

share = (full - predictions only) / full, with the peak memory of each. Then the relation losses
alone (forward + backward at the captured shapes of those layer pairs; bf16 autocast on CUDA, as
in the step), fused vs chunked vs autograd: time and peak memory.

    python benchmarks/minivit_relations.py --json rel.json --append-markdown benchmarks/RESULTS.md
    python benchmarks/minivit_relations.py --device cpu --quick      # smoke test of this script
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import timm
import torch

from vitfast.minivit import multiplex
from vitfast.minivit.distill import Capture, attention_relation_loss, hidden_relation_loss
from vitfast.minivit.relations import attention_relation_loss_lean, hidden_relation_loss_lean
from vitfast.minivit.pipeline import MiniViTConfig, _loss_fn, parse_pairs
from vitfast.timing import peak_memory_mb, time_ms
from markdown_out import emit

VARIANTS = {"predictions only": (0.0, 0.0, "fused"), "+ attention relations": (1.0, 0.0, "fused"),
            "+ hidden relations (full)": (1.0, 0.1, "fused"),
            "full, eager softmaxes (chunked)": (1.0, 0.1, "chunked"),
            "full, relations kept by autograd": (1.0, 0.1, "autograd")}


def measure(teacher_name: str, device, batch: int, reps: int, relation_heads: int) -> dict:
    teacher = timm.create_model(teacher_name).to(device).eval()
    student = multiplex(copy.deepcopy(teacher), "2").to(device).train()
    pairs = parse_pairs(None, student, teacher)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, teacher.num_classes, (batch,), device=device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    results = {"pairs": pairs, "width": int(teacher.embed_dim)}
    for name, (attn_w, hidden_w, impl) in VARIANTS.items():
        cfg = MiniViTConfig(teacher=teacher_name, attn_weight=attn_w, hidden_weight=hidden_w,
                            relation_heads=relation_heads, relation_impl=impl, device=str(device))
        cap_s = cap_t = None
        if attn_w > 0 or hidden_w > 0:
            cap_s = Capture(student, [s for s, _ in pairs], qkv=attn_w > 0, hidden=hidden_w > 0)
            cap_t = Capture(teacher, [t for _, t in pairs], qkv=attn_w > 0, hidden=hidden_w > 0)
        loss_fn = _loss_fn(cfg, teacher, cap_s, cap_t, None, device, teacher.num_classes)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _, _ = loss_fn(student, (x, y))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = time_ms(step, device, 2 if device.type == "cpu" else 3, reps)
        results[name] = {"step_ms": ms, "img_s": batch / ms * 1e3, "peak_mb": peak_memory_mb(step, device)}
        print(name, json.dumps(results[name]), flush=True)
        for cap in (cap_s, cap_t):
            if cap is not None:
                cap.close()
    full, base = results["+ hidden relations (full)"]["step_ms"], results["predictions only"]["step_ms"]
    results["relation_share"] = (full - base) / full
    results["attention_share"] = (results["+ attention relations"]["step_ms"] - base) / full
    kept = results["full, relations kept by autograd"]["step_ms"]
    results["relation_share_autograd"] = (kept - base) / kept
    eager = results["full, eager softmaxes (chunked)"]["step_ms"]
    results["relation_share_chunked"] = (eager - base) / eager
    return results


def measure_losses(device, batch: int, reps: int, pairs: int, tokens: int = 197, width: int = 384) -> dict:
    """The relation losses alone: `pairs` layer pairs of (batch, tokens, 3 * width) qkv and
    (batch, tokens, width) hidden states, student and teacher, the pipeline's weights."""
    sq = [torch.randn(batch, tokens, 3 * width, device=device, requires_grad=True) for _ in range(pairs)]
    tq = [torch.randn(batch, tokens, 3 * width, device=device) for _ in range(pairs)]
    sh = [torch.randn(batch, tokens, width, device=device, requires_grad=True) for _ in range(pairs)]
    th = [torch.randn(batch, tokens, width, device=device) for _ in range(pairs)]
    out = {}
    impls = {"fused": (attention_relation_loss_lean, hidden_relation_loss_lean),
             "chunked": (lambda a, b, h: attention_relation_loss_lean(a, b, h, fused=False), hidden_relation_loss_lean),
             "autograd": (attention_relation_loss, hidden_relation_loss)}
    for name, (attn, hidden) in impls.items():
        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = sum(attn(a, b, 1) for a, b in zip(sq, tq)) / pairs + \
                    0.1 * sum(hidden(a, b) for a, b in zip(sh, th)) / pairs
            torch.autograd.grad(loss, sq + sh)

        out[name] = {"ms": time_ms(step, device, 2, reps), "peak_mb": peak_memory_mb(step, device)}
        print("relation losses alone", name, json.dumps(out[name]), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--teacher", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--relation-heads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="bs 2, 2 repeats (smoke test)")
    ap.add_argument("--json")
    ap.add_argument("--append-markdown")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("minivit_relations.py: no CUDA device; use --device cpu --quick", file=sys.stderr)
        return 2
    batch, reps = (2, 2) if args.quick else (args.batch_size, args.reps)
    r = measure(args.teacher, device, batch, reps, args.relation_heads)
    r["losses_alone"] = measure_losses(device, batch, reps, len(r["pairs"]), width=r["width"])
    report = {"results": r, "teacher": args.teacher, "batch": batch, "relation_heads": args.relation_heads,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    lines = ["", "## MiniViT relation losses' share of a distillation step (`benchmarks/minivit_relations.py`)", "",
             f"Mini-{args.teacher} (share 2) from {args.teacher}, layer pairs {r['pairs']}, bs {batch}, "
             f"relation heads {args.relation_heads}, eager, {'bf16 autocast' if device.type == 'cuda' else 'float32'}; "
             f"{report['device']}, torch {report['torch']}, {report['date']}", "",
             "| variant | step ms | img/s | peak MB |", "|---|---|---|---|"]
    for name in VARIANTS:
        v = r[name]
        mem = "" if v["peak_mb"] is None else f"{v['peak_mb']:.0f}"
        lines.append(f"| {name} | {v['step_ms']:.1f} | {v['img_s']:.0f} | {mem} |")
    lines += ["", f"Relation losses: {100 * r['relation_share']:.0f}% of the full step (attention relations "
              f"{100 * r['attention_share']:.0f}%) fused, {100 * r['relation_share_chunked']:.0f}% with eager "
              f"softmaxes (chunked), {100 * r['relation_share_autograd']:.0f}% kept by autograd; issue 13 fuses them "
              "above 10%.", "",
              f"The relation losses alone ({len(r['pairs'])} layer pairs, 197 tokens, width {r['width']}, fwd+bwd, "
              f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}):",
              "", "| impl | ms | peak MB |", "|---|---|---|"]
    for name, v in r["losses_alone"].items():
        mem = "" if v["peak_mb"] is None else f"{v['peak_mb']:.0f}"
        lines.append(f"| {name} | {v['ms']:.1f} | {mem} |")
    text = "\n".join(lines) + "\n"
    emit(text, args.append_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
