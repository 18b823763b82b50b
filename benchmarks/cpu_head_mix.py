"""CPU timings of the fused head-mixing (talking-heads) attention (the CPU path, not a GPU claim):
the op against eager talking heads, the op's own SDPA route, and plain SDPA without the mixes (the
floor); and a Mini-DeiT-Ti (vitfast.minivit.multiplex, every 2 layers) against deit_tiny.

    python benchmarks/cpu_head_mix.py [--threads N] [--batch B] [--markdown FILE] [--quick]

Op shapes, float32, both transforms and the post-softmax bias: Mini-DeiT-Ti (16 sequences of 197
tokens, 3 heads of 64) and Mini-Swin-T stage 1 (256 windows of 49 tokens, 3 heads of 32, bias
table). Forward without grad; forward+backward with the gradients of qkv and the mixes. Models at
224 px: inference (eval, no grad) and a training step (forward + backward). Medians of repeated
runs in one process; the instruction set the kernels ran (VITFAST_CPU_ISA lowers it) is printed.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cpu_report import cpu_env, cpu_options, median_ms
from markdown_out import emit


def op_rows(name, B, H, N, d, table):
    from vitfast.ops import head_mix_attention

    qkv = torch.randn(B, N, 3 * H * d, requires_grad=True)
    pre = (torch.eye(H) + 0.1 * torch.randn(H, H)).requires_grad_()
    post = (torch.eye(H) + 0.1 * torch.randn(H, H)).requires_grad_()
    post_bias = (0.1 * torch.randn(H)).requires_grad_()
    side = int(N ** 0.5)
    tab = torch.randn(H, (2 * side - 1) ** 2) if table else None
    idx = torch.randint(0, (2 * side - 1) ** 2, (N, N)) if table else None
    bias = tab[:, idx] if table else None

    def fused(impl):
        return lambda: head_mix_attention(qkv, H, d, pre_mix=pre, post_mix=post, post_mix_bias=post_bias,
                                          bias_table=tab, bias_index=idx, impl=impl)

    def heads():
        return qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)

    def eager():  # timm CaiT's TalkingHeadAttn, with the table bias
        q, k, v = heads()
        a = (q * d ** -0.5) @ k.transpose(-2, -1)
        if table:
            a = a + bias
        a = torch.einsum("gh,bhij->bgij", pre, a).softmax(-1)
        a = torch.einsum("gh,bhij->bgij", post, a) + post_bias.view(1, H, 1, 1)
        return (a @ v).transpose(1, 2).reshape(B, N, H * d)

    def sdpa():  # no mixes: the floor
        q, k, v = heads()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(B, N, H * d)

    rows = []
    for label, f in (("vitfast (fused)", fused("fused")), ("vitfast impl=\"sdpa\"", fused("sdpa")),
                     ("eager talking heads", eager), ("SDPA, no mixes (floor)", sdpa)):
        with torch.no_grad():
            fwd = median_ms(f)
        both = median_ms(lambda: f().sum().backward(), warmup=2, reps=8)
        rows.append((name, label, fwd, both))
    return rows


def model_rows(batch):
    import timm

    from vitfast.minivit import multiplex

    torch.manual_seed(0)
    base = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    x = torch.randn(batch, 3, 224, 224)
    rows = []
    for label, model in (("deit_tiny_patch16_224", base), ("Mini (multiplex, share=2)", multiplex(copy.deepcopy(base)))):
        model.train()
        train = median_ms(lambda: model(x).sum().backward(), warmup=1, reps=5)
        model.eval()
        with torch.no_grad():
            infer = median_ms(lambda: model(x), warmup=1, reps=5)
        rows.append((label, train, infer))
    return rows


def main(argv=None) -> int:
    args = cpu_options(__doc__, argv, lambda ap: ap.add_argument("--batch", type=int, default=16))
    lines = [f"CPU path of head-mixing attention ({cpu_env()})", "",
             "| shape (fp32) | | forward ms | forward+backward ms |", "|---|---|---|---|"]
    rows = op_rows("Mini-DeiT-Ti: 16 x 197, 3 x 64", 16, 3, 197, 64, False)
    rows += op_rows("Mini-Swin-T s1: 256 x 49, 3 x 32, table", 256, 3, 49, 32, True)
    lines += [f"| {s} | {n} | {a:.2f} | {b:.2f} |" for s, n, a, b in rows]
    lines += ["", f"| model (batch {args.batch}, 224) | train step ms | inference ms |", "|---|---|---|"]
    lines += [f"| {m} | {t:.0f} | {i:.0f} |" for m, t, i in model_rows(args.batch)]
    text = "\n".join(lines) + "\n"
    emit(text, args.markdown, append=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
