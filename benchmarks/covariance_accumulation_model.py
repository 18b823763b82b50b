"""Model of the GPU covariance routes' rounding, to choose their row chunks without a GPU.

Tensor cores multiply exactly but accumulate with truncation: each step aligns its terms to the
largest exponent, drops the bits below (fp32's 24 plus `guard` extra bits) and rounds the sum
toward zero (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021; later GPUs keep a
few more guard bits). Unlike round-to-nearest, that error is biased, so it grows linearly with
the number of steps between float64 flushes. This script replays that model on the bar's kind
of data (means 100x the spread, decaying spectrum) for:

* split_gemm: centred fp32 values split into bf16 planes, P = [b1; b0]'[b1; b0] and
  X = [b1; b0]'[b0; b2] over chunks of L rows (16 products per mma step), flushed per chunk;
* tensor_core: 3xTF32 products (three k = 8 mma steps per 8 rows), flushed every F rows.

It prints the relative Frobenius error against float64 (the bar: 1e-5). A model, not a GPU
measurement: tests/test_covariance.py::test_cuda_bar_shape_accuracy checks the real thing.
    python benchmarks/covariance_accumulation_model.py
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def _trunc(x, exp2):
    q = np.ldexp(1.0, exp2)
    return np.trunc(x / q) * q


def _rz_fp32(x):
    m, e = np.frexp(x)
    return np.ldexp(np.trunc(np.ldexp(m, 24)), e - 24)


def mma_chain(a, b, group: int, guard: int):
    """a^T b for (k, m) float64 arrays of exactly representable inputs, `group` products per step."""
    acc = np.zeros((a.shape[1], b.shape[1]))
    for g in range(0, a.shape[0], group):
        terms = np.concatenate([acc[None], np.einsum("ki,kj->kij", a[g:g + group], b[g:g + group])], 0)
        mx = np.abs(terms).max(0)
        _, e = np.frexp(np.where(mx > 0, mx, 1.0))
        acc = _rz_fp32(_trunc(terms, (e - 24 - guard)[None]).sum(0))
    return acc


def _round(x, dtype):
    return torch.from_numpy(x).to(torch.float32).to(dtype).double().numpy()


def _tf32(x):  # round to nearest with 10 explicit mantissa bits
    m, e = np.frexp(x)
    return np.ldexp(np.round(np.ldexp(m, 11)), e - 11)


def data(rows, m, seed):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(m, m, dtype=torch.float64, generator=g) / m ** 0.5
    scales = torch.logspace(0, -3, m, dtype=torch.float64)
    return ((torch.randn(rows, m, dtype=torch.float64, generator=g) * scales) @ basis
            + 100 * torch.rand(m, dtype=torch.float64, generator=g)).float()


def rel_error(route: str, chunk: int, guard: int, rows: int, m: int, seed: int = 0) -> float:
    y = data(rows, m, seed)
    yd = y.double()
    mu_all = yd.mean(0)
    ref = ((yd - mu_all).T @ (yd - mu_all)).numpy()
    total = np.zeros((m, m))
    for r0 in range(0, rows, chunk):
        yc = y[r0:r0 + chunk]
        mu = yc.double().mean(0)
        c = (yc - mu.float()).double().numpy()  # centred in fp32, as the kernels do
        if route == "split_gemm":
            b0 = _round(c, torch.bfloat16)
            b1 = _round(c - b0, torch.bfloat16)
            b2 = _round(c - b0 - b1, torch.bfloat16)
            s = np.concatenate([b1, b0, b2])
            n = len(c)
            p = mma_chain(s[:2 * n], s[:2 * n], 16, guard)
            x = mma_chain(s[:2 * n], s[n:3 * n], 16, guard)
            g = p + x + x.T
        else:  # tensor_core: per 8 rows, three k = 8 mma steps: lo*hi, hi*lo, hi*hi (small terms first)
            hi = _tf32(c)
            lo = _tf32(c - hi)
            blocks = [(lo[k:k + 8], hi[k:k + 8], hi[k:k + 8], hi[k:k + 8], lo[k:k + 8], hi[k:k + 8])
                      for k in range(0, len(c), 8)]
            a = np.concatenate([np.concatenate(blk[:3]) for blk in blocks])
            b = np.concatenate([np.concatenate(blk[3:]) for blk in blocks])
            g = mma_chain(a, b, 8, guard)
        d = (mu - mu_all).numpy()
        total += g + len(c) * np.outer(d, d)
    return float(np.linalg.norm(total - ref) / np.linalg.norm(ref))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=48)
    ap.add_argument("--chunks", type=int, default=4, help="row chunks per case")
    args = ap.parse_args(argv)
    print("| route | rows per float64 flush | guard bits | rel. error vs float64 |")
    print("|---|---|---|---|")
    for route in ("split_gemm", "tensor_core"):
        for chunk in (256, 512, 1024, 2048, 4096):
            for guard in (0, 3):
                err = rel_error(route, chunk, guard, chunk * args.chunks, args.features)
                print(f"| {route} | {chunk} | {guard} | {err:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
