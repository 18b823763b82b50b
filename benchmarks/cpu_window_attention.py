"""CPU timings of the fused window attention (the CPU path, not a GPU claim): the op against
PyTorch's SDPA with a materialised bias, and patched against unpatched timm models.

    python benchmarks/cpu_window_attention.py [--threads N] [--batch B] [--markdown FILE] [--quick]

Op: Swin-T stage-1 windows (256 windows x 3 heads, N=49, d=32, float32, bias table), forward
(no grad) and forward+backward (qkv and table gradients), for a regular block and for a shifted one
(plus Swin's shift mask: 64 window types of a 56 x 56 map, shift 3). Models: swin_tiny_patch4_window7_224
and tiny_vit_5m_224 at batch 8, 224 px: a training step (forward + backward) and inference.
Medians of repeated runs in one process; the machine and thread count are printed with them.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cpu_report import cpu_env, cpu_options, median_ms
from markdown_out import emit


def shift_mask(size=56, window=7, shift=3):
    """Swin's mask of a cyclically shifted map: (types, N, N), -100 between tokens of different
    regions (the construction of timm's SwinTransformerBlock)."""
    region = torch.zeros(size, size)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (a, b) in enumerate((a, b) for a in cuts for b in cuts):
        region[a, b] = n
    ids = region.view(size // window, window, size // window, window).transpose(1, 2).reshape(-1, window * window)
    return (ids[:, :, None] != ids[:, None, :]).float() * -100.0


def op_rows():
    from vitfast.ops import window_attention

    B, H, N, d = 256, 3, 49, 32
    qkv = torch.randn(B, N, 3 * H * d, requires_grad=True)
    table = torch.randn(169, H, requires_grad=True)
    idx = torch.randint(0, 169, (N, N))
    mask = shift_mask()  # 64 types: window w has type w % 64, 4 images of 64 windows

    def ours(m):
        return window_attention(qkv, H, d, layout="swin", bias_table=table.t(), bias_index=idx, mask=m)

    def sdpa(m):
        q, k, v = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        bias = table[idx.view(-1)].view(N, N, H).permute(2, 0, 1).unsqueeze(0)
        if m is not None:  # (images, types, H, N, N) broadcast, as timm adds it
            bias = (bias.unsqueeze(0) + m[None, :, None]).reshape(-1, H, N, N).repeat(B // m.shape[0], 1, 1, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, N, H * d)

    rows = []
    for block, m in (("regular", None), ("shifted", mask)):
        for name, f in (("vitfast", ours), ("SDPA + materialised bias", sdpa)):
            with torch.no_grad():
                fwd = median_ms(lambda: f(m))
            both = median_ms(lambda: f(m).sum().backward())
            rows.append((block, name, fwd, both))
    return rows


def model_rows(batch):
    import timm

    import vitfast

    rows = []
    x = torch.randn(batch, 3, 224, 224)
    for name in ("swin_tiny_patch4_window7_224", "tiny_vit_5m_224"):
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False)
        for label, model in (("timm", base), ("vitfast.patch", vitfast.patch(copy.deepcopy(base)))):
            model.train()
            train = median_ms(lambda: model(x).sum().backward(), warmup=1, reps=5)
            model.eval()
            with torch.no_grad():
                infer = median_ms(lambda: model(x), warmup=1, reps=5)
            rows.append((name, label, train, infer))
    return rows


def main(argv=None) -> int:
    args = cpu_options(__doc__, argv, lambda ap: ap.add_argument("--batch", type=int, default=8))
    lines = [f"CPU path of window attention ({cpu_env()})", "",
             "| Swin-T stage 1, fp32 | op | forward ms | forward+backward ms |", "|---|---|---|---|"]
    lines += [f"| {blk} | {n} | {a:.1f} | {b:.1f} |" for blk, n, a, b in op_rows()]
    lines += ["", f"| model (batch {args.batch}, 224) | | train step ms | inference ms |", "|---|---|---|---|"]
    lines += [f"| {m} | {l} | {t:.0f} | {i:.0f} |" for m, l, t, i in model_rows(args.batch)]
    text = "\n".join(lines) + "\n"
    emit(text, args.markdown, append=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
