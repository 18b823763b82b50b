"""Small CUDA cases of every vitfast kernel, for compute-sanitizer (memcheck, racecheck,
synccheck, initcheck). Covers each code path: staged and unstaged top-k rows, 16-byte aligned and
misaligned rows, k = 1, k = C, ties, non-finite rows, every logits dtype of the loss.
Exits non-zero if any result disagrees with the reference, so a sanitizer run also checks values."""
import os
import sys

import torch

import vitfast
from vitfast.ops import qkv_layout, window_attention
from vitfast.ops.reference import (sparse_soft_target_cross_entropy_reference, topk_softmax_reference,
                                   window_attention_reference)


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
    out = window_attention(qkv, heads, dk, dv, layout=layout, bias_table=table, bias_index=index, mask=mask, **kw)
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


def main() -> int:
    torch.manual_seed(0)
    dev = "cuda"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        check_topk(torch.randn(3, 1000, device=dev).to(dtype), 10)
        check_topk(torch.randn(2, 4099, device=dev).to(dtype)[:, 1:], 100)          # misaligned rows
        check_topk(torch.randint(-2, 3, (2, 3000), device=dev).to(dtype), 64)      # heavy ties
    check_topk(torch.randn(2, 70000, device=dev), 128)                              # fp32 row > smem: unstaged
    check_topk(torch.randn(2, 7, device=dev), 7)                                    # k = C
    check_topk(torch.randn(1, 1, device=dev), 1)
    x = torch.randn(3, 500, device=dev)
    x[1, 3] = float("nan")
    check_topk(x, 5)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        check_ce(torch.randn(3, 1000, device=dev).to(dtype), 10)
        check_ce(torch.randn(2, 2003, device=dev).to(dtype)[:, 3:], 50)           # misaligned input rows
    check_ce(torch.randn(2, 5, device=dev), 5)                                      # k = C
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_cov((torch.randn(1500, 70, device=dev) + 50).to(dtype), 700)         # partial tiles, chunks
    check_cov(torch.randn(3000, 130, device=dev)[:, 1:], 3000)                      # strided rows (split GEMM)
    check_cov(torch.randn(3000, 130, device=dev)[:, 1:], 3000, "tensor_core")       # strided rows
    for dtype in (torch.float32, torch.bfloat16):  # split GEMM: several chunks, short last one, odd m
        os.environ["VITFAST_COVARIANCE_GEMM_ROWS"] = "256"
        check_cov((torch.randn(700, 131, device=dev) + 30).to(dtype), 600, "split_gemm")
        del os.environ["VITFAST_COVARIANCE_GEMM_ROWS"]
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        check_window(dev, dtype, (4, 49), 3, 32, 32, "swin", mask_types=2)          # Swin window, shift mask
    check_window(dev, torch.bfloat16, (2, 14, 14), 2, 32, 32, "swin", (7, 7), (3, 3), mask_types=4)  # grid
    check_window(dev, torch.bfloat16, (2, 30), 3, 16, 64, "tinyvit")             # dk != dv, partial tiles
    check_window(dev, torch.float16, (2, 20), 2, 24, 40, "tinyvit")              # head dims not /16, unaligned
    check_window(dev, torch.bfloat16, (1, 200), 1, 32, 32, "swin")               # several key tiles / chunks
    torch.cuda.synchronize()
    print("sanitize cases: all results match the references")
    return 0


if __name__ == "__main__":
    sys.exit(main())
