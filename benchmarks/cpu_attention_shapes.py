"""CPU forward timings of both attention ops over window / sequence lengths (the CPU path, not a
GPU claim): Swin stage 1 (N=49), TinyViT-like windows (N=100), Swin @384 (N=144), TinyViT 14 x 14
(N=196), DeiT (N=197). Each op alone (impl="fused", float32, no grad), medians of repeated calls in
one process; the register-tile choices of csrc/window_attention are tuned on this table.

    python benchmarks/cpu_attention_shapes.py [--threads N] [--markdown FILE]
"""
from __future__ import annotations

import argparse

import torch

from vitfast.timing import time_ms
from markdown_out import cpu_env, emit

# (label, windows or batch, heads, tokens, head dim, relative-position table)
SHAPES = [
    ("Swin-T s1", 256, 3, 49, 32, True),
    ("10 x 10 windows", 24, 4, 100, 32, True),
    ("Swin-B @384 s1", 64, 3, 144, 32, True),
    ("TinyViT 14 x 14", 32, 5, 196, 32, True),
    ("DeiT-Ti", 16, 3, 197, 64, False),
]


def rows(reps: int):
    from vitfast.ops import head_mix_attention, window_attention

    out = []
    for label, B, H, N, d, with_table in SHAPES:
        qkv = torch.randn(B, N, 3 * H * d)
        table = torch.randn(H, N) if with_table else None
        index = torch.randint(0, N, (N, N)) if with_table else None
        mix = torch.eye(H) + 0.3 * torch.randn(H, H)
        with torch.no_grad():
            wa = time_ms(lambda: window_attention(qkv, H, d, bias_table=table, bias_index=index, impl="fused"),
                         torch.device("cpu"), 3, reps)
            hm = time_ms(lambda: head_mix_attention(qkv, H, d, bias_table=table, bias_index=index, pre_mix=mix,
                                                    post_mix=mix, impl="fused"), torch.device("cpu"), 3, reps)
        out.append((f"{label}: {B} x {N}, {H} x {d}", wa, hm))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--markdown", help="write the table here too")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [f"CPU attention forward by shape ({cpu_env()})", "",
             "| shape (fp32) | window_attention ms | head_mix_attention ms |", "|---|---|---|"]
    lines += [f"| {s} | {a:.2f} | {b:.2f} |" for s, a, b in rows(args.reps)]
    emit("\n".join(lines) + "\n", args.markdown, append=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
