"""Head-mixing (talking-heads) attention cases of benchmarks/run_gpu.py: vitfast.head_mix_attention
("vitfast": the fused kernels; "vitfast sdpa": impl="sdpa", the mixes folded into
scaled_dot_product_attention calls) against, in the same run:

* "eager talking heads": timm CaiT's TalkingHeadAttn math (q*scale @ k^T, proj_l over the head
  axis, softmax, proj_w, @ v), four (B, H, N, N) tensors plus permute copies;
* "torch.compile(eager)": the same function compiled (skipped with --no-compile);
* "SDPA (no mixes)": F.scaled_dot_product_attention without the transforms -- the bar's yardstick;
* windowed shapes: "window_attention (no mixes)", vitfast's own kernel without the transforms.

Forward+backward = gradients of qkv and of both mixing matrices and biases (and the bias table).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitfast import _ext
from vitfast.ops import head_mix_attention, window_attention
from vitfast.timing import peak_memory_mb, time_ms
from window_attention_cases import environ, forced_route, swin_index

# name: (windows, N, heads, d, window types of the shift mask; 0: a plain sequence, no table, no mask).
# Mini-Swin at batch 128: stage 1 has 64 windows per image, stage 2 sixteen, stage 3 four; stages 2
# and 3 (6 and 12 heads) are past the register kernels (3-4 heads): their forward runs the streaming
# kernel, their backward the streaming backward (table and mask included; stage 3's 12 heads of 32
# by 8-key halves). The sequences' "vitfast" fwd column is the streaming forward too (what
# impl="auto" runs without gradients); every shape's backward past the register kernels is the
# streaming backward (3/4/6/8 heads, 12 of <= 32; DeiT-B's 12 heads of 64 on the head-split
# kernels), timed beside the tile backward behind the same forward. DeiT-B's forward is also timed
# on the head-split kernel ("vitfast (head-split forward)", VITFAST_HEAD_MIX_SPLIT_FWD=1); Mini-Swin-B
# stage 3 (16 heads) runs the head-split forward and backward.
SHAPES = {
    "deit_s_B128_H6_N197": (128, 197, 6, 64, 0),
    "deit_b_B128_H12_N197": (128, 197, 12, 64, 0),
    "deit_b384_B64_H12_N577": (64, 577, 12, 64, 0),
    "mini_swin_t_stage1": (8192, 49, 3, 32, 64),
    "mini_swin_b_stage1": (8192, 49, 4, 32, 64),
    "mini_swin_t_stage2": (2048, 49, 6, 32, 16),
    "mini_swin_t_stage3": (512, 49, 12, 32, 4),
    "mini_swin_b_stage3": (512, 49, 16, 32, 4),
}


def eager_talking_heads(qkv, heads, d, wl, bl, ww, bw, bias=None):
    """timm TalkingHeadAttn.forward after the qkv linear."""
    B, N, _ = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * d ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = F.linear(attn.permute(0, 2, 3, 1), wl.to(attn.dtype), bl.to(attn.dtype)).permute(0, 3, 1, 2)
    attn = attn.softmax(-1)
    attn = F.linear(attn.permute(0, 2, 3, 1), ww.to(attn.dtype), bw.to(attn.dtype)).permute(0, 3, 1, 2)
    return (attn @ v).transpose(1, 2).reshape(B, N, heads * d)


def bench_head_mix(device, name, dtype, reps, use_compile, quick=False):
    windows, n, heads, d, types = SHAPES[name]
    windowed = types > 0
    if quick:
        windows = 64 if windowed else 2
    qkv = (torch.randn(windows, n, 3 * heads * d, device=device) * 0.5).to(dtype).requires_grad_()
    mix = [(torch.eye(heads, device=device) + 0.1 * torch.randn(heads, heads, device=device)).requires_grad_(),
           (0.01 * torch.randn(heads, device=device)).requires_grad_(),
           (torch.eye(heads, device=device) + 0.1 * torch.randn(heads, heads, device=device)).requires_grad_(),
           (0.01 * torch.randn(heads, device=device)).requires_grad_()]
    table = index = mask = None
    if windowed:
        table = (torch.randn(heads, 169, device=device) * 0.02).requires_grad_()
        index = swin_index(7, 7, device)
        mask = torch.where(torch.rand(types, n, n, device=device) < 0.5, -100.0, 0.0)
    leaves = [qkv] + mix + ([table] if windowed else [])

    def ours(impl="fused"):
        return head_mix_attention(qkv, heads, d, pre_mix=mix[0], pre_mix_bias=mix[1], post_mix=mix[2],
                                  post_mix_bias=mix[3], bias_table=table, bias_index=index, mask=mask, impl=impl)

    def eager():
        return eager_talking_heads(qkv, heads, d, *mix)

    def eager_windowed():  # Mini-Swin order: table bias, pre-mix, then the shift mask
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * d ** -0.5) @ k.transpose(-2, -1) + table[:, index].to(qkv.dtype)
        attn = F.linear(attn.permute(0, 2, 3, 1), mix[0].to(attn.dtype), mix[1].to(attn.dtype)).permute(0, 3, 1, 2)
        attn = (attn.view(B // types, types, heads, N, N) + mask.to(attn.dtype)[None, :, None]).view(B, heads, N, N)
        attn = F.linear(attn.softmax(-1).permute(0, 2, 3, 1), mix[2].to(attn.dtype), mix[3].to(attn.dtype))
        return (attn.permute(0, 3, 1, 2) @ v).transpose(1, 2).reshape(B, N, heads * d)

    impls = {"vitfast": ours, "vitfast sdpa": lambda: ours("sdpa"),
             "eager talking heads": eager_windowed if windowed else eager}
    if use_compile:
        impls["torch.compile(eager)"] = torch.compile(impls["eager talking heads"], dynamic=False)
    route = _ext.head_mix_attention_route(torch.device(device), dtype, n, heads, d, d, table=windowed, mask=windowed)
    if route in ("registers", "stream", "stream+tiles"):  # the same call on the tile kernels (VITFAST_WINDOW_ATTENTION_ROUTE=tiles)
        impls["vitfast (tile kernels)"] = ours
    if route == "stream":  # the streaming forward with the tile backward (VITFAST_HEAD_MIX_STREAM_BWD=0)
        impls["vitfast (tile backward)"] = ours
    if route == "stream" and heads == 12 and d > 32:  # the head-split forward on request (DeiT-B)
        impls["vitfast (head-split forward)"] = ours
    if windowed:
        impls["window_attention (no mixes)"] = lambda: window_attention(qkv, heads, d, bias_table=table,
                                                                        bias_index=index, mask=mask)
    else:
        def sdpa():
            q, k, v = qkv.reshape(windows, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(windows, n, heads * d)

        impls["SDPA (no mixes)"] = sdpa
    fwd, fwd_bwd, mem = {}, {}, {}
    for label, fn in impls.items():
        grad = torch.randn_like(fn())
        wrt = [x for x in leaves if label in ("vitfast", "vitfast sdpa", "vitfast (tile kernels)",
                                              "vitfast (tile backward)", "vitfast (head-split forward)",
                                              "eager talking heads",
                                              "torch.compile(eager)") or x is qkv or x is table]

        def step(fn=fn, grad=grad, wrt=wrt):
            torch.autograd.grad(fn(), wrt, grad)

        with forced_route("tiles" if label == "vitfast (tile kernels)" else None), \
                environ("VITFAST_HEAD_MIX_STREAM_BWD", "0" if label == "vitfast (tile backward)" else None), \
                environ("VITFAST_HEAD_MIX_SPLIT_FWD", "1" if label == "vitfast (head-split forward)" else None):
            with torch.no_grad():
                fwd[label] = time_ms(fn, device, 3, reps)
            fwd_bwd[label] = time_ms(step, device, 3, reps)
            mem[label] = peak_memory_mb(step, device)
    return {"op": "head_mix_attention", "route": route,
            "shape": f"{name} ({windows} x N{n}, H{heads}, d{d}{', table + shift mask' if windowed else ''})",
            "dtype": str(dtype).replace("torch.", ""),
            "times_ms": {f"{k} fwd": v for k, v in fwd.items()} | {f"{k} fwd+bwd": v for k, v in fwd_bwd.items()},
            "peak_mem_mb": mem}


def head_mix_bars(cases):
    """Issue 12's bars (bf16): fwd+bwd >= 5x torch.compile of eager and <= 1.7x plain SDPA at the
    DeiT shapes; windowed: <= 1.3x window_attention without the transforms."""
    out = []
    for c in cases:
        if c["op"] != "head_mix_attention" or c["dtype"] != "bfloat16":
            continue
        t, name = c["times_ms"], c["shape"].split(" ")[0]
        # each implementation of the op against the bars: the faster one decides the default per shape
        for impl in ("vitfast", "vitfast sdpa"):
            if f"{impl} fwd+bwd" not in t:
                continue
            ours = t[f"{impl} fwd+bwd"]
            if "torch.compile(eager) fwd+bwd" in t:
                got = t["torch.compile(eager) fwd+bwd"] / ours
                out.append({"what": f"head_mix_attention ({impl}) {name} bf16 fwd+bwd vs torch.compile(eager)",
                            "need": 5.0, "got": got, "pass": got >= 5.0})
            base = "SDPA (no mixes) fwd+bwd" if "SDPA (no mixes) fwd+bwd" in t else "window_attention (no mixes) fwd+bwd"
            limit = 1.7 if base.startswith("SDPA") else 1.3
            ratio = ours / t[base]
            out.append({"what": f"head_mix_attention ({impl}) {name} bf16 fwd+bwd time / {base.replace(' fwd+bwd', '')}",
                        "need": f"<= {limit}", "got": ratio, "pass": ratio <= limit})
    return out


def head_mix_markdown(cases) -> list[str]:
    rows = [c for c in cases if c["op"] == "head_mix_attention"]
    if not rows:
        return []
    lines = ["", "## Head-mixing attention (ms; speed-up = baseline / vitfast, fwd+bwd)", "",
             "| shape | dtype | impl | fwd | fwd+bwd | speed-up fwd+bwd | peak MB fwd+bwd |", "|---|---|---|---|---|---|---|"]
    for c in rows:
        t = c["times_ms"]
        ours = t["vitfast fwd+bwd"]
        for impl in [k[:-len(" fwd")] for k in t if k.endswith(" fwd")]:
            mem = c["peak_mem_mb"].get(impl)
            lines.append(f"| {c['shape']} | {c['dtype']} | {impl} | {t[impl + ' fwd']:.4f} | {t[impl + ' fwd+bwd']:.4f} | "
                         f"{t[impl + ' fwd+bwd'] / ours:.2f}x | {'' if mem is None else f'{mem:.0f}'} |")
    return lines
