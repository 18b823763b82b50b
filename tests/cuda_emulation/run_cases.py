"""Builds the CUDA-emulator binding of vitfast's CUDA kernels and runs them on small cases against
the references; prints one JSON object {case: {metric: value}} on its last line (relative errors,
or 1/0 for exact checks). Run by tests/test_cuda_emulation.py in a subprocess (an emulated device
trap aborts the process).

    python tests/cuda_emulation/run_cases.py [case ...]"""
import glob
import json
import os
import sys
import time

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_window_attention import make_case  # noqa: E402

from vitfast.ops import OPS, qkv_layout  # noqa: E402
from vitfast.ops.reference import (dense_soft_target_cross_entropy_reference,  # noqa: E402
                                   head_mix_attention_reference,
                                   sparse_soft_target_cross_entropy_reference, topk_softmax_reference,
                                   window_attention_reference)


def build():
    """One binding for every op of vitfast.ops.OPS: its folder's glue (*_op.cpp) and CPU helpers
    (*_cpu.cpp, torch-free) plus tests/cuda_emulation/<folder>_emu.cpp, which includes the CUDA
    source itself."""
    folders = sorted({op.csrc for op in OPS.values()})
    sources = [os.path.join(ROOT, "tests", "cuda_emulation", "module.cpp")]
    for d in folders:
        emu = os.path.join(ROOT, "tests", "cuda_emulation", f"{d}_emu.cpp")
        if not os.path.exists(emu):
            raise SystemExit(f"op folder csrc/{d} has no CUDA emulator binding {emu}")
        sources.append(emu)
        sources += sorted(glob.glob(os.path.join(ROOT, "csrc", d, "*_op.cpp")))
        sources += sorted(glob.glob(os.path.join(ROOT, "csrc", d, "*_cpu.cpp")))
    asan = os.environ.get("VITFAST_EMU_ASAN") == "1"  # memcheck on the CPU: scripts/emulator_memcheck.sh
    out = os.path.join(ROOT, "build", "cuda_emulation_asan" if asan else "cuda_emulation")
    os.makedirs(out, exist_ok=True)
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    return cpp_extension.load(
        name="vitfast_cuda_emu_asan" if asan else "vitfast_cuda_emu", sources=sources,
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O2", "-std=c++20", "-DVITFAST_CUDA_EMULATION", "-DVITFAST_NO_REGISTRATION",
                      "-fno-strict-aliasing", "-w"] + sanitize,
        extra_ldflags=sanitize, build_directory=out, verbose=False)


# window attention -- name: (dtype, make_case kwargs); small shapes, each exercising one kernel path
WINDOW_CASES = {
    "swin_bf16_mask_slots": (torch.bfloat16, dict(windows=20, heads=3, dk=32, wh=7, ww=7, mask_types=4)),
    "swin_fp16": (torch.float16, dict(windows=3, heads=2, dk=32, wh=7, ww=7)),
    "swin_fp32_simt": (torch.float32, dict(windows=4, heads=3, dk=32, wh=7, ww=7, mask_types=2)),
    "swin_bf16_gathered_bias": (torch.bfloat16, dict(windows=6, heads=3, dk=32, wh=7, ww=7, mask_types=3,
                                                     bias_buffer=False)),
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
    "tinyvit5m_stage4_fp32": (torch.float32, dict(windows=2, heads=10, dk=32, dv=32, wh=7, ww=7, layout="tinyvit")),
    "key_chunks_fp64_n400": (torch.float64, dict(windows=1, heads=1, dk=32, wh=20, ww=20)),
    # register kernels (window_attention_reg.cuh): fp16/bf16, <= 64 tokens, head dims <= 64
    "reg_bf16_d64_n64_mask": (torch.bfloat16, dict(windows=6, heads=2, dk=64, wh=8, ww=8, mask_types=2)),
    "reg_fp16_dk48_n20_no_bias": (torch.float16, dict(windows=3, heads=2, dk=48, wh=4, ww=5, bias=False)),
    "reg_bf16_tinyvit_dk16_dv64": (torch.bfloat16, dict(windows=2, heads=3, dk=16, dv=64, wh=7, ww=7,
                                                         layout="tinyvit")),
    # the tile kernels on shapes the register kernels take by default (forced)
    "tiles_bf16_mask_slots": (torch.bfloat16, dict(windows=20, heads=3, dk=32, wh=7, ww=7, mask_types=4,
                                                   route="tiles")),
    "tiles_fp16_unaligned_scalar": (torch.float16, dict(windows=3, heads=2, dk=24, dv=40, wh=3, ww=5,
                                                        layout="tinyvit", row_pad=3, route="tiles")),
}
# opt-in (about 100 s emulated): python tests/cuda_emulation/run_cases.py key_chunks_bf16_n1024
EXTRA = {"key_chunks_bf16_n1024": (torch.bfloat16, dict(windows=1, heads=1, dk=32, wh=32, ww=32))}


# head-mixing attention -- name: (dtype, make_case kwargs, options); options: scratch=True keeps
# every accumulator in global scratch (VITFAST_HEAD_MIX_SCRATCH), bias_buffer=False gathers the
# table per score, split_fwd=True asks for the head-split forward (VITFAST_HEAD_MIX_SPLIT_FWD=1),
# fwd_only=True checks the forward alone (shapes whose backward is the op's composite)
HEAD_MIX_CASES = {
    # tile kernels (forced where the register kernels would take the shape)
    "mix_swin_bf16_mask_slots": (torch.bfloat16, dict(windows=6, heads=3, dk=32, wh=7, ww=7,
                                                                 mask_types=3), dict(route="tiles")),
    "mix_seq_bf16_one_tile": (torch.bfloat16, dict(windows=2, heads=4, dk=16, wh=1, ww=16, bias=False), {}),
    "mix_fp16_tinyvit_dk_ne_dv_gathered": (torch.float16, dict(windows=2, heads=2, dk=16, dv=32, wh=3, ww=6,
                                                               layout="tinyvit"), dict(bias_buffer=False)),
    "mix_fp32_simt_grid_shift": (torch.float32, dict(grid=(1, 8, 8), heads=2, dk=16, wh=4, ww=4, shift=(2, 2),
                                                     mask_types=4), {}),
    "mix_fp64_keys_70": (torch.float64, dict(windows=1, heads=3, dk=16, wh=7, ww=10), {}),
    "mix_bf16_20_heads_cap32": (torch.bfloat16, dict(windows=1, heads=20, dk=16, wh=4, ww=4, bias=False), {}),
    # float32 SIMT with CaiT's head dim 48 (8 heads fit a block; 16 -- CaiT-M36 -- do not: composite)
    "mix_fp32_cait_n50_dk48": (torch.float32, dict(windows=2, heads=8, dk=48, wh=1, ww=50, bias=False), {}),
    "mix_bf16_unaligned_scalar_loads": (torch.bfloat16, dict(windows=2, heads=2, dk=24, dv=40, wh=3, ww=5,
                                                             layout="tinyvit", row_pad=3), {}),
    "mix_bf16_global_scratch_keys_80": (torch.bfloat16, dict(windows=3, heads=4, dk=32, wh=8, ww=10, mask_types=3),
                                        dict(scratch=True, route="tiles")),
    # register kernels (head_mix_reg.cuh): fp16/bf16, <= 64 tokens, head dims <= 32, 3 or 4 heads;
    # 20 windows > the emulated device's 8 backward slots, so blocks loop over windows
    "mix_reg_swin_bf16_mask_slots": (torch.bfloat16, dict(windows=20, heads=3, dk=32, wh=7, ww=7, mask_types=4), {}),
    "mix_reg_fp16_n64_gathered": (torch.float16, dict(windows=4, heads=3, dk=32, wh=8, ww=8, mask_types=2),
                                  dict(bias_buffer=False)),
    "mix_reg_bf16_h4_swin_b": (torch.bfloat16, dict(windows=4, heads=4, dk=32, wh=7, ww=7, mask_types=2), {}),
    # 4 heads of 8 x 8 need 272 KB in the register backward: the streaming forward and the tile
    # backward take it
    "mix_stream_fp16_h4_n64": (torch.float16, dict(windows=2, heads=4, dk=32, wh=8, ww=8), {}),
    "mix_reg_bf16_grid_shift_dk16": (torch.bfloat16, dict(grid=(2, 8, 8), heads=3, dk=16, wh=4, ww=4, shift=(2, 2),
                                                          mask_types=4), {}),
    "mix_reg_fp16_tinyvit_dk16_dv32_no_bias": (torch.float16, dict(windows=2, heads=4, dk=16, dv=32, wh=3, ww=6,
                                                                   layout="tinyvit", bias=False), {}),
    "mix_reg_bf16_unaligned_scalar_loads": (torch.bfloat16, dict(windows=2, heads=3, dk=24, dv=24, wh=3, ww=5,
                                                                 layout="tinyvit", row_pad=3, mask_types=2), {}),
    # streaming forward (head_mix_stream.cuh; backward on the tile kernels): fp16/bf16, any length,
    # 3/4/6/8/12 heads of <= 64 channels, shapes the register kernels do not take
    "mix_stream_bf16_seq_n100_h6_d64": (torch.bfloat16, dict(windows=2, heads=6, dk=64, wh=1, ww=100, bias=False), {}),
    "mix_stream_fp16_deit_b_h12_d64_n100": (torch.float16, dict(windows=1, heads=12, dk=64, wh=1, ww=100, bias=False),
                                            {}),
    "mix_stream_fp16_h12_n49_table_mask": (torch.float16, dict(windows=4, heads=12, dk=32, wh=7, ww=7, mask_types=2),
                                           {}),
    "mix_stream_bf16_h3_d64_n80_table": (torch.bfloat16, dict(windows=2, heads=3, dk=64, wh=8, ww=10), {}),
    "mix_stream_bf16_h6_grid_shift": (torch.bfloat16, dict(grid=(1, 14, 14), heads=6, dk=32, wh=7, ww=7,
                                                           shift=(3, 3), mask_types=4), {}),
    "mix_stream_bf16_n65_dk16_dv64_two_chunks": (torch.bfloat16, dict(windows=2, heads=4, dk=16, dv=64, wh=5, ww=13,
                                                                       layout="tinyvit", bias=False), {}),
    "mix_stream_bf16_dk48_mask_only": (torch.bfloat16, dict(windows=4, heads=6, dk=48, wh=7, ww=7, bias=False,
                                                            mask_types=2), {}),
    "mix_stream_fp16_h8_dk40_dv24_scalar": (torch.float16, dict(windows=2, heads=8, dk=40, dv=24, wh=5, ww=15,
                                                                layout="tinyvit", row_pad=3, bias=False), {}),
    # streaming backward too (head_mix_stream_bwd.cuh): 3, 4, 6 or 8 heads, 12 of <= 32 channels,
    # with or without a table and a mask; the cases above with those shapes (n64 h4, n100 h6, h12 n49,
    # h3 table, h6 grid shift, n65 h4, mask only, h8 scalar) run it as well
    "mix_stream_bwd_fp16_h3_d64_n130_items": (torch.float16, dict(windows=3, heads=3, dk=64, wh=1, ww=130,
                                                                  bias=False), {}),
    "mix_stream_bwd_fp16_h6_d32_scalar": (torch.float16, dict(windows=2, heads=6, dk=32, wh=1, ww=80, row_pad=3,
                                                              bias=False), {}),
    "mix_stream_bwd_bf16_cait_h4_dk48_n70": (torch.bfloat16, dict(windows=2, heads=4, dk=48, wh=1, ww=70,
                                                                  bias=False), {}),
    # table and mask, the table gathered per score (no precomputed bias buffer), 12 windows over the
    # emulated device's 4 resident blocks (the per-block table-gradient sums loop over items)
    "mix_stream_bwd_fp16_h8_table_mask_items": (torch.float16, dict(windows=12, heads=8, dk=32, wh=7, ww=7,
                                                                    mask_types=3), dict(bias_buffer=False)),
    # 12 heads of <= 32 channels (Mini-Swin-T/S stage 3; products per 8-key half, mixing gradients in
    # passes over pairs of heads): shifted windows with table and mask over more windows than
    # resident blocks; a two-chunk sequence with scalar loads and padded head dims
    "mix_stream_bwd_bf16_h12_grid_shift_items": (torch.bfloat16, dict(grid=(2, 14, 14), heads=12, dk=32, wh=7, ww=7,
                                                                      shift=(3, 3), mask_types=4), {}),
    "mix_stream_bwd_fp16_h12_dk24_n70_scalar": (torch.float16, dict(windows=2, heads=12, dk=24, dv=16, wh=1, ww=70, layout="tinyvit",
                                                                    row_pad=3, bias=False), {}),
    # 12 heads of 48-64 channels (DeiT-B; head_mix_split_bwd.cuh, heads split between warps; the
    # n100 sequence above runs it too): shifted windows with table and mask, 32 items over the
    # emulated device's 4 resident blocks; scalar loads with padded, unequal head dims
    "mix_split_bwd_bf16_h12_dk48_grid_shift_items": (torch.bfloat16, dict(grid=(2, 14, 14), heads=12, dk=48, wh=7,
                                                                          ww=7, shift=(3, 3), mask_types=4), {}),
    "mix_split_bwd_fp16_h12_dk40_dv56_scalar": (torch.float16, dict(windows=2, heads=12, dk=40, dv=56, wh=1, ww=37,
                                                                    layout="tinyvit", row_pad=3, bias=False), {}),
    # the head-split forward (head_mix_split_fwd.cuh): 16 heads of <= 32 with the head-split
    # backward (Mini-Swin-B stage 3: shifted windows, table and mask; scalar loads); 16 of 48
    # (CaiT-M) and 24 of 32 (Mini-Swin-T stage 4, table only) with the tile backward; 12 of 64 on
    # request (VITFAST_HEAD_MIX_SPLIT_FWD=1), with the head-split backward
    "mix_split_bf16_h16_grid_shift": (torch.bfloat16, dict(grid=(2, 14, 14), heads=16, dk=32, wh=7, ww=7,
                                                           shift=(3, 3), mask_types=4), {}),
    "mix_split_fp16_h16_dk24_dv16_scalar": (torch.float16, dict(windows=2, heads=16, dk=24, dv=16, wh=1, ww=40,
                                                                layout="tinyvit", row_pad=3, bias=False), {}),
    "mix_split_fwd_fp16_cait_m_h16_dk48_n50": (torch.float16, dict(windows=2, heads=16, dk=48, wh=1, ww=50,
                                                                   bias=False), {}),
    # (24 heads of 32 in 16 bits: no tile backward fits a block, the op's backward is the composite)
    "mix_split_fwd_bf16_h24_stage4_table": (torch.bfloat16, dict(windows=3, heads=24, dk=32, wh=7, ww=7),
                                            dict(fwd_only=True)),
    "mix_split_fwd_bf16_deit_b_forced_n70_scalar": (torch.bfloat16, dict(windows=2, heads=12, dk=64, wh=1, ww=70,
                                                                         row_pad=3, bias=False),
                                                    dict(split_fwd=True)),
    # the tile backward behind the streaming forward (VITFAST_HEAD_MIX_STREAM_BWD=0)
    "mix_stream_tile_bwd_bf16_h6_n100": (torch.bfloat16, dict(windows=2, heads=6, dk=64, wh=1, ww=100, bias=False),
                                         dict(stream_bwd=False)),
}


def run_head_mix(mod, dtype, kw, opts):
    kw = dict(kw)
    bias_buffer = opts.get("bias_buffer", True)
    if opts.get("scratch"):
        os.environ["VITFAST_HEAD_MIX_SCRATCH"] = "1"
    if opts.get("route"):
        os.environ["VITFAST_WINDOW_ATTENTION_ROUTE"] = opts["route"]
    if opts.get("stream_bwd") is False:
        os.environ["VITFAST_HEAD_MIX_STREAM_BWD"] = "0"
    if opts.get("split_fwd"):
        os.environ["VITFAST_HEAD_MIX_SPLIT_FWD"] = "1"
    torch.manual_seed(0)
    case = make_case("cpu", dtype, **kw)
    heads, dk, dv = case["heads"], case["dk"], case["dv"]
    offsets, hs = qkv_layout(case["layout"], heads, dk, dv)
    window = list(case["window_size"]) if case["window_size"] else []
    shift = list(case["shift"]) if case["window_size"] else []
    table = case["table"].t().contiguous().t() if case["table"] is not None else None
    pdt = torch.float64 if dtype == torch.float64 else torch.float32  # parameters as under autocast
    mix = [(torch.eye(heads) + 0.3 * torch.randn(heads, heads)).to(pdt), (0.1 * torch.randn(heads)).to(pdt),
           (torch.eye(heads) + 0.3 * torch.randn(heads, heads)).to(pdt), (0.1 * torch.randn(heads)).to(pdt)]
    args = (table, case["index"], case["mask"], *mix, heads, dk, dv, offsets, hs, dk ** -0.5, window, shift)
    try:
        n = case["window_size"][0] * case["window_size"][1] if case["window_size"] else case["qkv"].shape[1]
        routes = mod.head_mix_routes(case["qkv"], heads, dk, dv, n, table is not None, case["mask"] is not None)
        out, lse = mod.head_mix_attention_forward(bias_buffer, case["qkv"], *args)
        if opts.get("fwd_only"):  # no fused backward fits: compare the forward, run it twice
            g1 = [out]
            g2 = [mod.head_mix_attention_forward(bias_buffer, case["qkv"], *args)[0]]
        else:
            grad = torch.randn_like(out)
            g1 = mod.head_mix_attention_backward(bias_buffer, grad, case["qkv"], lse, *args)
            g2 = mod.head_mix_attention_backward(bias_buffer, grad, case["qkv"], lse, *args)
    finally:
        os.environ.pop("VITFAST_HEAD_MIX_SCRATCH", None)
        os.environ.pop("VITFAST_WINDOW_ATTENTION_ROUTE", None)
        os.environ.pop("VITFAST_HEAD_MIX_STREAM_BWD", None)
        os.environ.pop("VITFAST_HEAD_MIX_SPLIT_FWD", None)
    deterministic = float(all(torch.equal(a, b) for a, b in zip(g1, g2)))
    q64 = case["qkv"].double().requires_grad_()
    leaves = [q64] + ([case["table"].double().requires_grad_()] if table is not None else [])
    m64 = [m.double().requires_grad_() for m in mix]
    ref = head_mix_attention_reference(q64, heads, dk, dv, offsets, hs, dk ** -0.5,
                                       leaves[1] if table is not None else None, case["index"], case["mask"],
                                       m64[0], m64[1], m64[2], m64[3], window, shift)
    if opts.get("fwd_only"):
        return {"out": rel(out, ref), "deterministic": deterministic, "routes": routes}
    rg = torch.autograd.grad(ref, leaves + [m64[0], m64[2], m64[3]], grad.double())
    gq, gt, gpre, gpost, gpb = g1
    res = {"out": rel(out, ref), "grad_qkv": rel(gq, rg[0]), "deterministic": deterministic, "routes": routes}
    rest = rg[1:]
    if table is not None:
        res["grad_table"] = rel(gt, rest[0])
        rest = rest[1:]
    res.update(grad_pre_mix=rel(gpre, rest[0]), grad_post_mix=rel(gpost, rest[1]), grad_post_mix_bias=rel(gpb, rest[2]))
    return res


def topk_case(make, k):
    def run(mod):
        x = make()
        v, i = mod.topk_softmax(x, k, 1.0, None)
        rv, ri = topk_softmax_reference(x, k)
        ok_nan = torch.equal(torch.isnan(v), torch.isnan(rv))
        finite = ~torch.isnan(rv)
        return {"indices_equal": float(torch.equal(i, ri)), "nan_rows_equal": float(ok_nan),
                "values": rel(v[finite].float(), rv[finite].float()) if finite.any() else 0.0}
    return run


def nan_row():
    x = torch.randn(3, 500)
    x[1, 3] = float("nan")
    return x


def ce_case(make, k):
    def run(mod):
        x = make()
        c = x.shape[1]
        torch.manual_seed(1)
        v, i = topk_softmax_reference(torch.randn(x.shape[0], c), k)
        loss, lse = mod.soft_target_ce_forward(x, v, i, c)
        g = torch.rand_like(loss)
        grad = mod.soft_target_ce_backward(g, x, v, i, lse)
        x64 = x.double().requires_grad_()
        ref = sparse_soft_target_cross_entropy_reference(x64, v, i, c, "none")
        (rg,) = torch.autograd.grad(ref, x64, g.double())
        return {"loss": rel(loss, ref), "grad": rel(grad, rg)}
    return run


def dense_ce_case(make, scales=(1.0, 1.0), teacher_dtype=None, want_grad=True):
    """make() -> (student, teacher); the teacher in its own dtype when given (mixed dtypes)."""
    def run(mod):
        s, t = make()
        if teacher_dtype is not None:
            t = t.to(teacher_dtype)
        loss, grad = mod.dense_soft_target_ce(s, t, scales[0], scales[1], want_grad)
        s64 = s.double().requires_grad_()
        ref = dense_soft_target_cross_entropy_reference(s64, t, *scales, "none")
        (rg,) = torch.autograd.grad(ref.sum(), s64)
        out = {"loss": rel(loss, ref), "loss_dtype_ok": float(loss.dtype == ref.dtype if torch.float64 in
                                                               (s.dtype, t.dtype) else loss.dtype == torch.float32)}
        out["grad"] = rel(grad, rg) if want_grad else float(grad.numel() == 0)
        return out
    return run


def dense_ce_nan_rows_case():
    """Rows without a distribution (teacher all -inf, a NaN, student all -inf) give NaN loss and
    gradient rows, like the reference; the other rows match it (both the warp and block paths)."""
    def run(mod):
        out = {}
        for cols in (40, 2000):
            s, t = torch.randn(4, cols), torch.randn(4, cols)
            t[0] = float("-inf")
            t[1, 3] = float("nan")
            s[2] = float("-inf")
            loss, grad = mod.dense_soft_target_ce(s, t, 1.0, 1.0, True)
            s64 = s.double().requires_grad_()
            ref = dense_soft_target_cross_entropy_reference(s64, t, 1.0, 1.0, "none")
            (rg,) = torch.autograd.grad(ref[3], s64)
            out[f"nan_rows_{cols}"] = float(torch.isnan(loss[:3]).all().item() and torch.isnan(grad[:3]).all().item()
                                            and torch.isnan(ref[:3]).all().item())
            out[f"loss_{cols}"] = rel(loss[3:], ref[3:])
            out[f"grad_{cols}"] = rel(grad[3], rg[3])
        return out
    return run


def _pair(rows, cols, dtype, sl=None, scale=3.0, neg_inf=False):
    """Student and teacher logits of one dtype; `sl` slices the columns (rows not 16-byte aligned);
    neg_inf: teacher -inf entries, some where the student is -inf too (they must add nothing)."""
    def make():
        s, t = (torch.randn(rows, cols) * scale).to(dtype), (torch.randn(rows, cols) * scale).to(dtype)
        if neg_inf:
            t[:, ::7] = float("-inf")
            s[:, ::14] = float("-inf")
        return (s[:, sl], t[:, sl]) if sl is not None else (s, t)
    return make


def cov_case(make, chunk, cc_major=9, method="auto", gemm_chunk_rows=4096):
    """Streams y in parts of `chunk` rows; `gemm_chunk_rows` small: several split-GEMM chunks."""
    def run(mod):
        os.environ["VITFAST_EMU_CC_MAJOR"] = str(cc_major)  # 7: no tensor cores (auto -> SIMT)
        y = make()
        count = torch.zeros((), dtype=torch.float64)
        mean = torch.zeros(y.shape[1], dtype=torch.float64)
        m2 = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float64)
        routes = {mod.covariance_update_(count, mean, m2, part, method, gemm_chunk_rows) for part in y.split(chunk)}
        yd = y.double()
        ref = (yd - yd.mean(0)).T @ (yd - yd.mean(0))
        m2u = torch.triu(m2)  # the op keeps the upper triangle
        return {"count": float(count.item() == y.shape[0]), "mean": rel(mean, yd.mean(0)),
                "m2": rel(m2u, torch.triu(ref)), "route": "+".join(sorted(routes))}
    return run


def _g(seed):
    torch.manual_seed(seed)


# other kernels -- name: (dtype used for tolerances, runner)
KERNEL_CASES = {
    "topk_fp16": (torch.float16, topk_case(lambda: torch.randn(3, 1000).half(), 10)),
    "topk_bf16_misaligned_rows": (torch.bfloat16, topk_case(lambda: torch.randn(2, 4099).bfloat16()[:, 1:], 100)),
    "topk_fp32_ties": (torch.float32, topk_case(lambda: torch.randint(-2, 3, (2, 3000)).float(), 64)),
    "topk_fp32_unstaged_row": (torch.float32, topk_case(lambda: torch.randn(2, 70000), 128)),
    "topk_k_equals_c": (torch.float32, topk_case(lambda: torch.randn(2, 7), 7)),
    "topk_nan_row": (torch.float32, topk_case(nan_row, 5)),
    "ce_bf16": (torch.bfloat16, ce_case(lambda: torch.randn(3, 1000).bfloat16(), 10)),
    "ce_fp16_misaligned": (torch.float16, ce_case(lambda: torch.randn(2, 2003).half()[:, 3:], 50)),
    "ce_fp32": (torch.float32, ce_case(lambda: torch.randn(3, 1000), 10)),
    # logits near 1e4: the loss is a small difference of large sums (found on the H100)
    "ce_fp32_large_logits": (torch.float32, ce_case(lambda: torch.randn(4, 1000) * 3 + 1e4, 10)),
    "ce_fp64_k_equals_c": (torch.float64, ce_case(lambda: torch.randn(2, 5).double(), 5)),
    # dense soft-target CE: warp-per-row (<= 1024 classes) and block-per-row paths
    "dense_ce_bf16_relation_rows": (torch.bfloat16, dense_ce_case(_pair(37, 197, torch.bfloat16), (0.125, 0.09))),
    "dense_ce_fp16_misaligned": (torch.float16, dense_ce_case(_pair(5, 51, torch.float16, sl=slice(1, None)))),
    "dense_ce_fp32_block_rows_neg_inf": (torch.float32, dense_ce_case(_pair(3, 3000, torch.float32, neg_inf=True),
                                                                      (0.5, 0.25))),
    "dense_ce_fp32_warp_rows_neg_inf": (torch.float32, dense_ce_case(_pair(9, 100, torch.float32, neg_inf=True))),
    "dense_ce_fp64_teacher_bf16_block": (torch.float64, dense_ce_case(_pair(2, 1500, torch.float64), (1.0, 2.0),
                                                                      teacher_dtype=torch.bfloat16)),
    "dense_ce_bf16_fp32_teacher_no_grad": (torch.bfloat16, dense_ce_case(_pair(6, 40, torch.bfloat16),
                                                                          teacher_dtype=torch.float32, want_grad=False)),
    "dense_ce_fp32_rows_without_distribution": (torch.float32, dense_ce_nan_rows_case()),
    # one-kernel route: 3xTF32 tensor cores (forced where auto would pick the split GEMM) or SIMT
    "cov_fp32_offset_means_chunks": (torch.float32, cov_case(lambda: torch.randn(1500, 70) + 50, 700)),
    "cov_bf16": (torch.bfloat16, cov_case(lambda: (torch.randn(1100, 65) + 5).bfloat16(), 1100)),
    "cov_fp32_strided_rows": (torch.float32, cov_case(lambda: torch.randn(1200, 130)[:, 1:], 1200,
                                                       method="tensor_core")),
    "cov_fp32_long_chunk_flushes": (torch.float32, cov_case(lambda: torch.randn(2600, 40) * 3 + 100, 2600)),
    "cov_bf16_vector_loads_partial_chunk": (torch.bfloat16,
                                            cov_case(lambda: (torch.randn(900, 72) + 20).bfloat16()[:, :70], 900)),
    "cov_fp16_vector_loads": (torch.float16, cov_case(lambda: torch.randn(700, 136).half(), 700, method="tensor_core")),
    "cov_fp32_simt_pre_ampere": (torch.float32, cov_case(lambda: torch.randn(1500, 70) + 50, 700, cc_major=7)),
    # split-GEMM route: bf16 planes + a float32 GEMM standing in for cuBLAS, several chunks per call
    "cov_split_gemm_fp32_large_means_chunks": (torch.float32, cov_case(
        lambda: torch.randn(1500, 130) * torch.logspace(0, -2, 130) + 100 * torch.rand(130), 700, gemm_chunk_rows=256)),
    "cov_split_gemm_bf16_strided_rows": (torch.bfloat16, cov_case(
        lambda: (torch.randn(900, 131) + 20).bfloat16()[:, 1:], 900, gemm_chunk_rows=384)),
    "cov_split_gemm_fp16_forced_small_m": (torch.float16, cov_case(
        lambda: (torch.randn(600, 40) * 2 + 3).half(), 250, method="split_gemm", gemm_chunk_rows=100)),
    "cov_split_gemm_fp32_one_row_parts": (torch.float32, cov_case(
        lambda: torch.randn(5, 140) + 7, 1, method="split_gemm")),
}
CASES = {**WINDOW_CASES, **HEAD_MIX_CASES, **KERNEL_CASES}


def rel(a, b):
    a, b = a.double(), b.double()
    if b.norm() == 0:
        return a.abs().max().item()
    return ((a - b).norm() / b.norm()).item()


def run_window(mod, dtype, kw):
    kw = dict(kw)
    bias_buffer = kw.pop("bias_buffer", True)  # as the CUDA glue does; False: per-score gathers
    forced = kw.pop("route", None)  # "tiles": VITFAST_WINDOW_ATTENTION_ROUTE=tiles
    if forced:
        os.environ["VITFAST_WINDOW_ATTENTION_ROUTE"] = forced
    try:
        return _run_window(mod, dtype, kw, bias_buffer)
    finally:
        os.environ.pop("VITFAST_WINDOW_ATTENTION_ROUTE", None)


def _run_window(mod, dtype, kw, bias_buffer):
    torch.manual_seed(0)
    case = make_case("cpu", dtype, **kw)
    heads, dk, dv = case["heads"], case["dk"], case["dv"]
    offsets, hs = qkv_layout(case["layout"], heads, dk, dv)
    window = list(case["window_size"]) if case["window_size"] else []
    shift = list(case["shift"]) if case["window_size"] else []
    table = case["table"].t().contiguous().t() if case["table"] is not None else None  # Swin-like strides
    args = (table, case["index"], case["mask"], heads, dk, dv, offsets, hs, dk ** -0.5, window, shift)
    n = case["window_size"][0] * case["window_size"][1] if case["window_size"] else case["qkv"].shape[1]
    route = mod.window_attention_route(case["qkv"], heads, dk, dv, n)
    out, lse = mod.window_attention_forward(bias_buffer, case["qkv"], *args)
    grad = torch.randn_like(out)
    gq, gt = mod.window_attention_backward(bias_buffer, grad, case["qkv"], out, lse, *args)
    gq2, gt2 = mod.window_attention_backward(bias_buffer, grad, case["qkv"], out, lse, *args)
    deterministic = float(torch.equal(gq, gq2) and torch.equal(gt, gt2))  # threads interleave differently
    q64 = case["qkv"].double().requires_grad_()
    t64 = case["table"].double().requires_grad_() if case["table"] is not None else None
    ref = window_attention_reference(q64, heads, dk, dv, offsets, hs, dk ** -0.5, t64, case["index"],
                                     case["mask"], window, shift)
    rq, *rt = torch.autograd.grad(ref, [q64] + ([t64] if t64 is not None else []), grad.double())
    rt = rt[0] if rt else None
    res = {"out": rel(out, ref), "grad_qkv": rel(gq, rq), "deterministic": deterministic, "route": route}
    if case["table"] is not None:
        res["grad_table"] = rel(gt, rt)
    return res


def main():
    t0 = time.time()
    mod = build()
    print(f"built in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    names = sys.argv[1:] or list(CASES)
    unknown = [n for n in names if n not in CASES and n not in EXTRA]
    if unknown:
        raise SystemExit(f"run_cases.py: unknown cases {unknown}; the cases: {' '.join(CASES)}")
    results = {}
    for name in names:
        t0 = time.time()
        torch.manual_seed(0)
        if name in KERNEL_CASES:
            results[name] = KERNEL_CASES[name][1](mod)
        elif name in HEAD_MIX_CASES:
            results[name] = run_head_mix(mod, *HEAD_MIX_CASES[name])
        else:
            results[name] = run_window(mod, *{**WINDOW_CASES, **EXTRA}[name])
        print(name, results[name], f"{time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
