"""CPU forward timings of both attention ops over window / sequence lengths (the CPU path, not a
GPU claim): Swin stage 1 (N=49), TinyViT-like windows (N=100), Swin @384 (N=144), TinyViT 14 x 14
(N=196), DeiT (N=197). Each op alone (impl="fused", float32, no grad), beside PyTorch's
scaled_dot_product_attention on the same qkv (no mixes; the table bias materialised as its mask):
medians of repeated calls in one process; the register-tile choices of csrc/window_attention are
tuned on this table.

    python benchmarks/cpu_attention_shapes.py [--threads N] [--reps N] [--markdown FILE] [--quick]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cpu_report import cpu_env, cpu_options, median_ms
from markdown_out import emit

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

        def sdpa():
            q, k, v = qkv.view(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
            bias = table[:, index] if with_table else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, N, H * d)

        with torch.no_grad():
            wa = median_ms(lambda: window_attention(qkv, H, d, bias_table=table, bias_index=index, impl="fused"),
                           reps=reps)
            hm = median_ms(lambda: head_mix_attention(qkv, H, d, bias_table=table, bias_index=index, pre_mix=mix,
                                                      post_mix=mix, impl="fused"), reps=reps)
            ref = median_ms(sdpa, reps=reps)
        out.append((f"{label}: {B} x {N}, {H} x {d}", wa, hm, ref))
    return out


def main(argv=None) -> int:
    args = cpu_options(__doc__, argv, lambda ap: ap.add_argument("--reps", type=int, default=40))
    lines = [f"CPU attention forward by shape ({cpu_env()})", "",
             "| shape (fp32) | window_attention ms | head_mix_attention ms | SDPA ms (no mixes) |",
             "|---|---|---|---|"]
    lines += [f"| {s} | {a:.2f} | {b:.2f} | {c:.2f} |" for s, a, b, c in rows(args.reps)]
    emit("\n".join(lines) + "\n", args.markdown, append=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
