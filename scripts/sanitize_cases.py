"""Small CUDA cases of every vitfast kernel, for compute-sanitizer (memcheck, racecheck,
synccheck, initcheck); `python scripts/sanitize_cases.py [op ...]` runs a subset. Covers each code path: staged and unstaged top-k rows, 16-byte aligned and
misaligned rows, k = 1, k = C, ties, non-finite rows, every logits dtype of the loss.
Exits non-zero if any result disagrees with the reference, so a sanitizer run also checks values."""
import argparse
import os
import sys

import torch

import vitfast
from vitfast.ops import OPS, head_mix_attention, qkv_layout, window_attention
from vitfast.ops.reference import (dense_soft_target_cross_entropy_reference, head_mix_attention_reference,
                                   sparse_soft_target_cross_entropy_reference,
                                   topk_softmax_reference, window_attention_reference)


def check_topk(x, k):
    v, i = vitfast.topk_softmax(x, k)
    rv, ri = topk_softmax_reference(x.cpu(), k)
    assert torch.equal(i.cpu(), ri), f"topk indices differ for {tuple(x.shape)} {x.dtype} k={k}"
    torch.testing.assert_close(v.cpu(), rv, rtol=1e-3, atol=1e-7, equal_nan=True)


def check_ce(x, k):
    c = x.shape[1]
    v, i = vitfast.topk_softmax(torch.randn(x.shape[0], c, device=x.device), k)
    xg = x.detach().requires_grad_()
    loss = vitfast.sparse_soft_target_cross_entropy(xg, v, i, c)
    loss.backward()
    x64 = x.detach().cpu().double().requires_grad_()
    ref = sparse_soft_target_cross_entropy_reference(x64, v.cpu(), i.cpu(), c)
    ref.backward()
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item()), (loss.item(), ref.item())
    err = ((xg.grad.cpu().double() - x64.grad).norm() / x64.grad.norm()).item()
    assert err < tol, f"CE grad rel err {err} for {tuple(x.shape)} {x.dtype}"


def check_dense_ce(s, t, scales=(1.0, 1.0)):
    sg = s.detach().requires_grad_()
    loss = vitfast.ops.dense_soft_target_cross_entropy(sg, t, *scales, reduction="sum")
    loss.backward()
    s64 = s.detach().cpu().double().requires_grad_()
    ref = dense_soft_target_cross_entropy_reference(s64, t.cpu(), *scales, "sum")
    ref.backward()
    tol = 1e-2 if s.dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item()), (loss.item(), ref.item())
    err = ((sg.grad.cpu().double() - s64.grad).norm() / s64.grad.norm()).item()
    assert err < tol, f"dense CE grad rel err {err} for {tuple(s.shape)} {s.dtype}"


def check_cov(y, chunks_of, method="auto"):
    acc = vitfast.ops.CovarianceAccumulator(y.shape[1], y.device, method=method)
    for part in y.split(chunks_of):
        acc.update(part)
    yd = y.double().cpu()
    ref = (yd - yd.mean(0)).T @ (yd - yd.mean(0)) / yd.shape[0]
    err = ((acc.covariance().cpu() - ref).norm() / ref.norm()).item()
    assert err < 1e-5, f"covariance rel err {err} for {tuple(y.shape)} {y.dtype}"


def check_window(dev, dtype, lead, heads, dk, dv, layout, ws=None, shift=(0, 0), mask_types=0, table_len=9):
    """window_attention forward + backward (qkv and table gradients) against float64."""
    offsets, hs = qkv_layout(layout, heads, dk, dv)
    qkv = torch.randn(*lead, heads * (2 * dk + dv), device=dev).to(dtype).requires_grad_()
    n = ws[0] * ws[1] if ws else lead[1]
    table = torch.randn(heads, table_len, device=dev).requires_grad_()
    index = torch.randint(0, table_len, (n, n), device=dev)
    mask = torch.where(torch.rand(mask_types, n, n, device=dev) < 0.3, -100.0, 0.0) if mask_types else None
    kw = dict(window_size=ws, shift_size=shift) if ws else {}
    # impl="fused": vitfast's kernels on every shape (impl="auto" sends 16-bit windows over 64
    # tokens to PyTorch's SDPA, which is not what the sanitizers are here for)
    out = window_attention(qkv, heads, dk, dv, layout=layout, bias_table=table, bias_index=index, mask=mask,
                           impl="fused", **kw)
    g = torch.randn_like(out)
    gq, gt = torch.autograd.grad(out, (qkv, table), g)
    q64 = qkv.detach().cpu().double().requires_grad_()
    t64 = table.detach().cpu().double().requires_grad_()
    ref = window_attention_reference(q64, heads, dk, dv, offsets, hs, dk ** -0.5, t64, index.cpu(),
                                     None if mask is None else mask.cpu(), ws or (), shift if ws else ())
    rq, rt = torch.autograd.grad(ref, (q64, t64), g.cpu().double())
    tol = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    for name, a, b in (("out", out, ref), ("grad qkv", gq, rq), ("grad table", gt, rt)):
        err = ((a.detach().cpu().double() - b).norm() / b.norm()).item()
        assert err < tol, f"window_attention {name} rel err {err} for {lead} {dtype} {layout}"


def check_head_mix(dev, dtype, lead, heads, d, ws=None, shift=(0, 0), mask_types=0, table_len=0):
    """head_mix_attention forward + backward (qkv, table and all mixing gradients) against float64."""
    offsets, hs = qkv_layout("swin", heads, d, d)
    qkv = torch.randn(*lead, 3 * heads * d, device=dev).to(dtype).requires_grad_()
    n = ws[0] * ws[1] if ws else lead[1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    mix = [(torch.eye(heads, device=dev) + 0.3 * torch.randn(heads, heads, device=dev)).to(pdt).requires_grad_(),
           (0.1 * torch.randn(heads, device=dev)).to(pdt).requires_grad_(),
           (torch.eye(heads, device=dev) + 0.3 * torch.randn(heads, heads, device=dev)).to(pdt).requires_grad_(),
           (0.1 * torch.randn(heads, device=dev)).to(pdt).requires_grad_()]
    table = torch.randn(heads, table_len, device=dev).requires_grad_() if table_len else None
    index = torch.randint(0, table_len, (n, n), device=dev) if table_len else None
    mask = torch.where(torch.rand(mask_types, n, n, device=dev) < 0.3, -100.0, 0.0) if mask_types else None
    kw = dict(window_size=ws, shift_size=shift) if ws else {}
    # impl="fused": vitfast's kernels on every shape (auto sends CUDA sequences with gradients to SDPA)
    out = head_mix_attention(qkv, heads, d, bias_table=table, bias_index=index, mask=mask, pre_mix=mix[0],
                             pre_mix_bias=mix[1], post_mix=mix[2], post_mix_bias=mix[3], impl="fused", **kw)
    g = torch.randn_like(out)
    wrt = [qkv, mix[0], mix[2], mix[3]] + ([table] if table is not None else [])
    got = torch.autograd.grad(out, wrt, g)
    c = lambda t: None if t is None else t.detach().cpu().double().requires_grad_()  # noqa: E731
    q64, m64, t64 = c(qkv), [c(m) for m in mix], c(table)
    ref = head_mix_attention_reference(q64, heads, d, d, offsets, hs, d ** -0.5, t64,
                                       None if index is None else index.cpu(), None if mask is None else mask.cpu(),
                                       *m64, ws or (), shift if ws else ())
    want = torch.autograd.grad(ref, [q64, m64[0], m64[2], m64[3]] + ([t64] if t64 is not None else []), g.cpu().double())
    tol = 5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    for name, a, b in zip(("out", "grad qkv", "grad pre_mix", "grad post_mix", "grad post_mix_bias", "grad table"),
                          (out,) + got, (ref,) + want):
        err = ((a.detach().cpu().double() - b).norm() / b.norm()).item()
        assert err < tol, f"head_mix_attention {name} rel err {err} for {lead} {dtype} H{heads}"


def _misaligned_nan_row(dev):
    x = torch.randn(3, 500, device=dev)
    x[1, 3] = float("nan")
    return x


def _cov_split_gemm(dev, dtype):  # split GEMM: several chunks, short last one, odd m
    os.environ["VITFAST_COVARIANCE_GEMM_ROWS"] = "256"
    try:
        check_cov((torch.randn(700, 131, device=dev) + 30).to(dtype), 600, "split_gemm")
    finally:
        del os.environ["VITFAST_COVARIANCE_GEMM_ROWS"]


def _window_tiles(dev):  # the tile kernels on a shape the register kernels take by default
    os.environ["VITFAST_WINDOW_ATTENTION_ROUTE"] = "tiles"
    try:
        check_window(dev, torch.bfloat16, (4, 49), 3, 32, 32, "swin", mask_types=2)
    finally:
        del os.environ["VITFAST_WINDOW_ATTENTION_ROUTE"]


def _head_mix_tiles(dev):  # the head-mix tile kernels on a shape the register kernels take by default
    os.environ["VITFAST_WINDOW_ATTENTION_ROUTE"] = "tiles"
    try:
        check_head_mix(dev, BF16, (4, 49), 3, 32, mask_types=2, table_len=169)
    finally:
        del os.environ["VITFAST_WINDOW_ATTENTION_ROUTE"]


def _head_mix_scratch(dev):  # every accumulator in global scratch
    os.environ["VITFAST_HEAD_MIX_SCRATCH"] = "1"
    try:
        check_head_mix(dev, torch.bfloat16, (2, 35), 4, 32, mask_types=1, table_len=20)
    finally:
        del os.environ["VITFAST_HEAD_MIX_SCRATCH"]


def _empty_batch(dev, mix: bool):  # zero windows / images: nothing launched, empty or zero gradients
    op = head_mix_attention if mix else window_attention
    for lead, kw in (((0, 16), {}), ((0, 8, 8), dict(window_size=(4, 4), shift_size=(2, 2)))):
        qkv = torch.randn(*lead, 3 * 2 * 16, device=dev, requires_grad=True)
        table = torch.randn(2, 49, device=dev, requires_grad=True)
        extra = dict(post_mix=torch.eye(2, device=dev, requires_grad=True)) if mix else {}
        out = op(qkv, 2, 16, bias_table=table, bias_index=torch.zeros(16, 16, dtype=torch.long, device=dev), **kw,
                 **extra)
        assert out.shape == (*lead, 32), out.shape
        grads = torch.autograd.grad(out.sum(), [qkv, table, *extra.values()], allow_unused=True)
        assert grads[0].shape == qkv.shape and all(g is None or not g.any() for g in grads[1:])


H16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# public op name (vitfast.ops.OPS) -> its cases, smallest first (--smallest runs only that one);
# every op must have some
CASES = {
    "topk_softmax": [
        lambda d: check_topk(torch.randn(3, 1000, device=d).half(), 10),
        *[lambda d, t=t: check_topk(torch.randn(3, 1000, device=d).to(t), 10) for t in (BF16, F32)],
        *[lambda d, t=t: check_topk(torch.randn(2, 4099, device=d).to(t)[:, 1:], 100) for t in (H16, BF16, F32)],
        *[lambda d, t=t: check_topk(torch.randint(-2, 3, (2, 3000), device=d).to(t), 64) for t in (H16, BF16, F32)],
        lambda d: check_topk(torch.randn(2, 70000, device=d), 128),  # fp32 row > smem: unstaged
        lambda d: check_topk(torch.randn(2, 7, device=d), 7),        # k = C
        lambda d: check_topk(torch.randn(1, 1, device=d), 1),
        lambda d: check_topk(_misaligned_nan_row(d), 5),
    ],
    "sparse_soft_target_cross_entropy": [
        *[lambda d, t=t: check_ce(torch.randn(3, 1000, device=d).to(t), 10) for t in (BF16, H16, F32, torch.float64)],
        *[lambda d, t=t: check_ce(torch.randn(2, 2003, device=d).to(t)[:, 3:], 50) for t in (BF16, H16, F32)],
        lambda d: check_ce(torch.randn(2, 5, device=d), 5),          # k = C
        lambda d: check_ce(torch.randn(4, 1000, device=d) * 3 + 1e4, 10),  # large logits: float64 lse
    ],
    "dense_soft_target_cross_entropy": [
        # relation rows (warp per row), misaligned rows, block per row with -inf teacher entries
        *[lambda d, t=t: check_dense_ce(torch.randn(40, 197, device=d).to(t), torch.randn(40, 197, device=d).to(t),
                                        (0.125, 0.1)) for t in (BF16, H16, F32, torch.float64)],
        lambda d: check_dense_ce(torch.randn(5, 52, device=d).half()[:, 1:], torch.randn(5, 52, device=d)[:, 1:]),
        lambda d: check_dense_ce(torch.randn(3, 3000, device=d),
                                 torch.randn(3, 3000, device=d).index_fill_(1, torch.arange(0, 3000, 7, device=d),
                                                                            float("-inf"))),
    ],
    "covariance_update": [
        *[lambda d, t=t: check_cov((torch.randn(1500, 70, device=d) + 50).to(t), 700) for t in (F32, BF16, H16)],
        lambda d: check_cov(torch.randn(3000, 130, device=d)[:, 1:], 3000),                 # strided (split GEMM)
        lambda d: check_cov(torch.randn(3000, 130, device=d)[:, 1:], 3000, "tensor_core"),  # strided rows
        *[lambda d, t=t: _cov_split_gemm(d, t) for t in (F32, BF16)],
    ],
    "window_attention": [
        *[lambda d, t=t: check_window(d, t, (4, 49), 3, 32, 32, "swin", mask_types=2) for t in
          (BF16, H16, F32, torch.float64)],                                                # Swin window, shift mask
        lambda d: check_window(d, BF16, (2, 14, 14), 2, 32, 32, "swin", (7, 7), (3, 3), mask_types=4),  # grid
        lambda d: check_window(d, BF16, (2, 30), 3, 16, 64, "tinyvit"),  # dk != dv, partial tiles
        lambda d: check_window(d, H16, (2, 20), 2, 24, 40, "tinyvit"),   # head dims not /16, unaligned
        lambda d: check_window(d, BF16, (1, 200), 1, 32, 32, "swin"),    # several key tiles / chunks
        # register kernels: head dim 64; more windows than bias-gradient slots (each block loops)
        lambda d: check_window(d, BF16, (3, 64), 2, 64, 64, "swin", mask_types=3),
        lambda d: check_window(d, BF16, (1440, 49), 3, 32, 32, "swin", mask_types=4),
        _window_tiles,
        lambda d: _empty_batch(d, mix=False),
    ],
    "head_mix_attention": [
        lambda d: check_head_mix(d, BF16, (2, 40), 3, 32),                                   # registers, pipelined (racecheck)
        lambda d: check_head_mix(d, BF16, (1, 70), 6, 32),                                   # streaming fwd + bwd (racecheck)
        lambda d: check_head_mix(d, BF16, (1, 40), 12, 64),                                  # head-split bwd: exchanges (racecheck)
        lambda d: check_head_mix(d, H16, (2, 197), 12, 64),                                  # head-split bwd: DeiT-B rows, 13 chunks
        lambda d: check_head_mix(d, BF16, (8, 49), 12, 48, mask_types=2, table_len=169),    # head-split bwd + table/mask
        lambda d: check_head_mix(d, BF16, (8, 49), 16, 32, mask_types=2, table_len=169),    # head-split fwd + bwd, 16 heads
        lambda d: check_head_mix(d, H16, (2, 49), 24, 32, table_len=169),                    # head-split fwd, 24 heads
        lambda d: check_head_mix(d, BF16, (1, 70), 16, 48),                                  # head-split fwd, CaiT-M dims
        lambda d: check_head_mix(d, BF16, (2, 40), 4, 32),                                   # a sequence
        lambda d: check_head_mix(d, BF16, (3, 197), 6, 64),                                  # streaming: DeiT-S rows, 4 chunks
        lambda d: check_head_mix(d, H16, (2, 130), 4, 48),                                   # streaming bwd: CaiT dims, 3 chunks
        lambda d: check_head_mix(d, BF16, (1, 100), 8, 48),                                  # streaming bwd: CaiT-S heads (221 KB)
        lambda d: check_head_mix(d, H16, (8, 49), 12, 32, mask_types=2, table_len=169),     # streaming fwd + bwd, mixed bias (stage 3)
        lambda d: check_head_mix(d, BF16, (2, 70), 12, 24),                                  # streaming bwd: 12 heads, 2 chunks
        lambda d: check_head_mix(d, BF16, (12, 49), 6, 32, mask_types=4, table_len=169),    # streaming bwd + table/mask (stage 2)
        lambda d: check_head_mix(d, BF16, (4, 49), 3, 32, mask_types=2, table_len=169),      # Mini-Swin window (registers)
        lambda d: check_head_mix(d, H16, (24, 49), 4, 32, mask_types=4, table_len=169),     # 4 heads, slot loop (registers)
        lambda d: check_head_mix(d, BF16, (300, 49), 3, 32, mask_types=4, table_len=169),   # pipelined, > one wave of slots
        lambda d: check_head_mix(d, BF16, (2, 20), 3, 24, mask_types=2, table_len=64),      # scalar loads (registers)
        _head_mix_tiles,
        lambda d: check_head_mix(d, F32, (1, 8, 8), 2, 16, (4, 4), (2, 2), mask_types=4, table_len=49),  # grid
        lambda d: check_head_mix(d, BF16, (1, 16), 20, 16),                                  # > 16 heads
        _head_mix_scratch,
        lambda d: _empty_batch(d, mix=True),
    ],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("ops", nargs="*", help="a subset of vitfast.ops.OPS (default: all)")
    ap.add_argument("--smallest", action="store_true", help="one small case per op (racecheck, synccheck)")
    ap.add_argument("--device", default="cuda", help="cpu: check this script itself")
    args = ap.parse_args(argv)
    missing = set(OPS) - set(CASES)
    if missing:
        print(f"sanitize_cases.py: no cases for op(s) {sorted(missing)}", file=sys.stderr)
        return 2
    names = args.ops or list(CASES)
    # --smallest (racecheck): the first case of each op; head_mix_attention's first three, so its
    # cp.async-pipelined kernels run (the register backward, the streaming forward and backward,
    # the head-split backward's shared-memory exchanges)
    smallest = {"head_mix_attention": 3}
    torch.manual_seed(0)
    for name in names:
        for case in CASES[name][:smallest.get(name, 1)] if args.smallest else CASES[name]:
            case(args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize cases ({', '.join(names)}{', smallest' if args.smallest else ''}): all results match the references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
