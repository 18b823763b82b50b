"""Builds the CUDA-emulator binding of the window-attention kernels and runs them on small cases
against the float64 reference; prints one JSON object {case: {out, grad_qkv, grad_table}} (relative
errors) on its last line. Run by tests/test_cuda_emulation.py in a subprocess (an emulated device
trap aborts the process)."""
import json
import os
import sys
import time

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_window_attention import make_case  # noqa: E402

from vitfast.ops import qkv_layout  # noqa: E402
from vitfast.ops.reference import window_attention_reference  # noqa: E402


def build():
    out = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(out, exist_ok=True)
    return cpp_extension.load(
        name="vitfast_cuda_emu",
        sources=[os.path.join(ROOT, "tests", "cuda_emulation", "window_attention_emu.cpp"),
                 os.path.join(ROOT, "csrc", "window_attention", "window_attention_op.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O2", "-std=c++20", "-DVITFAST_CUDA_EMULATION", "-DVITFAST_NO_REGISTRATION",
                      "-fno-strict-aliasing", "-w"],
        build_directory=out, verbose=False)


# name: (dtype, make_case kwargs); small shapes, each exercising one kernel path
CASES = {
    "swin_bf16_mask_slots": (torch.bfloat16, dict(windows=20, heads=3, dk=32, wh=7, ww=7, mask_types=4)),
    "swin_fp16": (torch.float16, dict(windows=3, heads=2, dk=32, wh=7, ww=7)),
    "swin_fp32_simt": (torch.float32, dict(windows=4, heads=3, dk=32, wh=7, ww=7, mask_types=2)),
    "swin_fp64_simt": (torch.float64, dict(windows=3, heads=2, dk=16, wh=4, ww=5, mask_types=3)),
    "tinyvit_bf16_dk16_dv64_n196": (torch.bfloat16, dict(windows=1, heads=3, dk=16, dv=64, wh=14, ww=14,
                                                          layout="tinyvit")),
    "grid_shift_bf16": (torch.bfloat16, dict(grid=(2, 14, 14), heads=2, dk=32, wh=7, ww=7, shift=(3, 3),
                                             mask_types=4)),
    "grid_rect_fp32": (torch.float32, dict(grid=(1, 8, 12), heads=1, dk=16, wh=4, ww=6, shift=(1, 5),
                                           mask_types=4)),
    "unaligned_rows_fp16_scalar_path": (torch.float16, dict(windows=3, heads=2, dk=24, dv=40, wh=3, ww=5,
                                                            layout="tinyvit", row_pad=3)),
    "one_token_bf16": (torch.bfloat16, dict(windows=2, heads=1, dk=16, wh=1, ww=1)),
    "key_chunks_fp64_n400": (torch.float64, dict(windows=1, heads=1, dk=32, wh=20, ww=20)),
}
# opt-in (about 100 s emulated): python tests/cuda_emulation/run_cases.py key_chunks_bf16_n1024
EXTRA = {"key_chunks_bf16_n1024": (torch.bfloat16, dict(windows=1, heads=1, dk=32, wh=32, ww=32))}


def rel(a, b):
    a, b = a.double(), b.double()
    if b.norm() == 0:
        return a.abs().max().item()
    return ((a - b).norm() / b.norm()).item()


def run(mod, dtype, kw):
    torch.manual_seed(0)
    case = make_case("cpu", dtype, **kw)
    heads, dk, dv = case["heads"], case["dk"], case["dv"]
    offsets, hs = qkv_layout(case["layout"], heads, dk, dv)
    window = list(case["window_size"]) if case["window_size"] else []
    shift = list(case["shift"]) if case["window_size"] else []
    table = case["table"].t().contiguous().t() if case["table"] is not None else None  # Swin-like strides
    args = (table, case["index"], case["mask"], heads, dk, dv, offsets, hs, dk ** -0.5, window, shift)
    out, lse = mod.forward(case["qkv"], *args)
    grad = torch.randn_like(out)
    gq, gt = mod.backward(grad, case["qkv"], out, lse, *args)
    q64 = case["qkv"].double().requires_grad_()
    t64 = case["table"].double().requires_grad_()
    ref = window_attention_reference(q64, heads, dk, dv, offsets, hs, dk ** -0.5, t64, case["index"],
                                     case["mask"], window, shift)
    rq, rt = torch.autograd.grad(ref, (q64, t64), grad.double())
    return {"out": rel(out, ref), "grad_qkv": rel(gq, rq), "grad_table": rel(gt, rt)}


def main():
    t0 = time.time()
    mod = build()
    print(f"built in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    names = sys.argv[1:] or list(CASES)
    results = {}
    for name in names:
        t0 = time.time()
        results[name] = run(mod, *{**CASES, **EXTRA}[name])
        print(name, results[name], f"{time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
