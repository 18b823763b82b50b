"""Window-attention cases of benchmarks/run_gpu.py: vitfast.ops.window_attention against timm's
two paths on the same shapes, forward and forward+backward (grads of qkv and the bias table):

* "SDPA + materialised bias": timm's fused path -- gather the (H, N, N) bias from the table, add
  the shift mask expanded to (windows, H, N, N), F.scaled_dot_product_attention.
* "eager (timm)": q*scale @ k^T + bias (+ mask), softmax, @ v.
* "vitfast grid": the same attention fed the whole (B, H, W, C) map with the shift done inside the
  kernel (the baselines' roll + partition copies are not even counted for them).
* "vitfast (tile kernels)": where the register kernels run by default (16-bit, <= 64 tokens), the
  same call on the shared-memory-tile kernels (VITFAST_WINDOW_ATTENTION_ROUTE=tiles), to measure
  what the register kernels changed.
* "vitfast (fused)": where impl="auto" picks SDPA (16-bit windows over 64 tokens), vitfast's own
  kernels on the same shape.

Floor: bytes the forward must move (qkv read, output written, lse) over the measured copy bandwidth.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from vitfast import _ext
from vitfast.ops import qkv_layout, window_attention
from vitfast.ops.window_attention import auto_impl
from vitfast.timing import peak_memory_mb, time_ms


def swin_index(wh, ww, device):
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return ((rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1).to(device)


# name, images, grid (H, W), window, heads, dk, dv, layout, shift
SHAPES = {
    "swin_t_stage1": (128, (56, 56), 7, 3, 32, 32, "swin", 3),
    "tinyvit_21m_stage3": (128, (14, 14), 14, 12, 32, 32, "tinyvit", 0),
}


def route_of(dtype, tokens, heads, dk, dv) -> str:
    """'registers' or 'tiles': the CUDA kernels window_attention runs for this shape."""
    return _ext.window_attention_route(torch.device("cuda"), dtype, tokens, heads, dk, dv)


@contextlib.contextmanager
def environ(name, value):
    """Environment variable `name` set to `value` inside the block (None: left as it is)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def forced_route(route):
    """VITFAST_WINDOW_ATTENTION_ROUTE=route inside the block (None: leave the default)."""
    return environ("VITFAST_WINDOW_ATTENTION_ROUTE", route)


def make_inputs(device, dtype, images, grid, ws, heads, dk, dv, layout, shift):
    gh, gw = grid
    offsets, head_stride = qkv_layout(layout, heads, dk, dv)
    channels = heads * (2 * dk + dv)
    fmap = torch.randn(images, gh, gw, channels, device=device, dtype=dtype)
    windows = fmap.view(images, gh // ws, ws, gw // ws, ws, channels).permute(0, 1, 3, 2, 4, 5).reshape(
        -1, ws * ws, channels).contiguous()
    length = (2 * ws - 1) ** 2
    table = (torch.randn(heads, length, device=device) * 0.02).requires_grad_()
    index = swin_index(ws, ws, device)
    mask = None
    if shift:
        types = (gh // ws) * (gw // ws)
        mask = torch.where(torch.rand(types, ws * ws, ws * ws, device=device) < 0.5, -100.0, 0.0)
    return dict(fmap=fmap, windows=windows, table=table, index=index, mask=mask, offsets=offsets,
                head_stride=head_stride)


def split_qkv(qkv, heads, dk, dv, layout):
    B, N, _ = qkv.shape
    if layout == "swin":
        return qkv.reshape(B, N, 3, heads, dk).permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = qkv.view(B, N, heads, -1).split([dk, dk, dv], dim=3)
    return q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)


def timm_bias(inp, heads, mask, windows):
    n = inp["index"].shape[0]
    bias = inp["table"][:, inp["index"].view(-1)].view(heads, n, n)
    if mask is None:
        return bias.unsqueeze(0)
    types = mask.shape[0]
    m = mask.view(1, types, 1, n, n).expand(windows // types, -1, heads, -1, -1).reshape(-1, heads, n, n)
    return bias.unsqueeze(0) + m


def bench_window_attention(device, name, dtype, reps, bw_gbs, quick=False):
    images, grid, ws, heads, dk, dv, layout, shift = SHAPES[name]
    if quick:
        images = 2
    inp = make_inputs(device, dtype, images, grid, ws, heads, dk, dv, layout, shift)
    scale = dk ** -0.5
    qkv_w = inp["windows"].requires_grad_()
    fmap = inp["fmap"].requires_grad_()
    n_windows = qkv_w.shape[0]

    def ours_windows(impl="auto"):
        return window_attention(qkv_w, heads, dk, dv, layout=layout, bias_table=inp["table"],
                                bias_index=inp["index"], mask=inp["mask"], impl=impl)

    def ours_grid():
        return window_attention(fmap, heads, dk, dv, layout=layout, bias_table=inp["table"],
                                bias_index=inp["index"], mask=inp["mask"], window_size=(ws, ws),
                                shift_size=(shift, shift))

    def sdpa():
        q, k, v = split_qkv(qkv_w, heads, dk, dv, layout)
        bias = timm_bias(inp, heads, inp["mask"], n_windows).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(n_windows, -1, heads * dv)

    def eager():
        q, k, v = split_qkv(qkv_w, heads, dk, dv, layout)
        attn = (q * scale) @ k.transpose(-2, -1)
        attn = attn + timm_bias(inp, heads, inp["mask"], n_windows).to(attn.dtype)
        return (attn.softmax(-1) @ v).transpose(1, 2).reshape(n_windows, -1, heads * dv)

    impls = {"vitfast": ours_windows, "vitfast grid": ours_grid, "SDPA + materialised bias": sdpa,
             "eager (timm)": eager}
    auto = auto_impl(qkv_w, dk, dv, None)
    if device == "cuda" and auto == "fused" and route_of(dtype, ws * ws, heads, dk, dv) == "registers":
        # the same call on the tile kernels (VITFAST_WINDOW_ATTENTION_ROUTE=tiles)
        impls["vitfast (tile kernels)"] = lambda: ours_windows("fused")
    if auto != "fused":  # auto took SDPA: what vitfast's own kernels do on this shape
        impls["vitfast (fused)"] = lambda: ours_windows("fused")
    fwd, fwd_bwd, mem = {}, {}, {}
    for label, fn in impls.items():
        x = fmap if label == "vitfast grid" else qkv_w
        with forced_route("tiles" if label == "vitfast (tile kernels)" else None):
            grad = torch.randn_like(fn())

            def step(fn=fn, x=x, grad=grad):
                torch.autograd.grad(fn(), (x, inp["table"]), grad)

            with torch.no_grad():
                fwd[label] = time_ms(fn, device, 5, reps)
            fwd_bwd[label] = time_ms(step, device, 5, reps)
            mem[label] = peak_memory_mb(step, device)
    elem = torch.finfo(dtype).bits // 8
    tokens = n_windows * ws * ws
    bytes_fwd = tokens * heads * (2 * dk + dv) * elem + tokens * heads * dv * elem + tokens * heads * 4
    return {
        "route": route_of(dtype, ws * ws, heads, dk, dv) if device == "cuda" else "cpu", "auto_impl": auto,
        "op": "window_attention", "shape": f"{name} ({n_windows} windows, H{heads}, N{ws * ws}, dk{dk}, dv{dv}"
        f"{', shift mask' if shift else ''})", "dtype": str(dtype).replace("torch.", ""),
        "times_ms": {f"{k} fwd": v for k, v in fwd.items()} | {f"{k} fwd+bwd": v for k, v in fwd_bwd.items()},
        "peak_mem_mb": mem, "floor_bytes": bytes_fwd, "floor_ms": bytes_fwd / (bw_gbs * 1e9) * 1e3,
    }


def window_bars(cases):
    """The issue's bars: fwd+bwd >= 2x SDPA (both shapes), >= 3x eager (Swin), forward within 2x
    of the bandwidth floor."""
    out = []
    need = {("swin_t_stage1", "SDPA + materialised bias"): 2.0, ("swin_t_stage1", "eager (timm)"): 3.0,
            ("tinyvit_21m_stage3", "SDPA + materialised bias"): 2.0}
    for c in cases:
        if c["op"] != "window_attention" or c["dtype"] != "bfloat16":
            continue
        name = c["shape"].split(" ")[0]
        t = c["times_ms"]
        best = min(t["vitfast fwd+bwd"], t["vitfast grid fwd+bwd"])
        for (shape, base), factor in need.items():
            if shape == name:
                got = t[f"{base} fwd+bwd"] / best
                out.append({"what": f"window_attention {name} bf16 fwd+bwd vs {base}", "need": factor, "got": got,
                            "pass": got >= factor})
        ratio = t["vitfast fwd"] / c["floor_ms"]
        out.append({"what": f"window_attention {name} bf16 forward / bandwidth floor ({c['floor_bytes'] / 1e6:.0f} MB)",
                    "need": "<= 2", "got": ratio, "pass": ratio <= 2})
    return out


def window_markdown(cases) -> list[str]:
    rows = [c for c in cases if c["op"] == "window_attention"]
    if not rows:
        return []
    lines = ["", "## Window attention (ms; speed-up = baseline / vitfast, fwd+bwd)", "",
             "\"vitfast\" is the default (impl=\"auto\"); its route per shape: "
             + "; ".join(f"{c['shape'].split(' ')[0]} {c['dtype']}: {c.get('auto_impl', 'fused')}"
                         f"{' (' + c['route'] + ' kernels)' if c.get('auto_impl', 'fused') == 'fused' else ''}"
                         for c in rows) + ".", "",
             "| shape | dtype | impl | fwd | fwd+bwd | speed-up fwd+bwd | peak MB fwd+bwd | fwd floor |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        t = c["times_ms"]
        ours = t["vitfast fwd+bwd"]
        for impl in ("vitfast", "vitfast grid", "vitfast (tile kernels)", "vitfast (fused)", "SDPA + materialised bias",
                     "eager (timm)"):
            if impl + " fwd" not in t:
                continue
            mem = c["peak_mem_mb"].get(impl)
            lines.append(f"| {c['shape']} | {c['dtype']} | {impl} | {t[impl + ' fwd']:.4f} | "
                         f"{t[impl + ' fwd+bwd']:.4f} | {t[impl + ' fwd+bwd'] / ours:.2f}x | "
                         f"{'' if mem is None else f'{mem:.0f}'} | "
                         f"{c['floor_ms']:.4f} ({c['floor_bytes'] / 1e6:.0f} MB) |" if impl == "vitfast" else
                         f"| {c['shape']} | {c['dtype']} | {impl} | {t[impl + ' fwd']:.4f} | "
                         f"{t[impl + ' fwd+bwd']:.4f} | {t[impl + ' fwd+bwd'] / ours:.2f}x | "
                         f"{'' if mem is None else f'{mem:.0f}'} | |")
    return lines
