"""vitfast's CUDA kernels' own source, compiled as C++ against vitfast's CPU emulator of the CUDA
subset they use (threads and barriers, warp shuffles and votes, static and dynamic shared memory,
atomics, WMMA fragments with their alignment rules), run on small cases against the references.
This is how CI checks the GPU code paths on machines without a GPU: window attention (register
kernels with mma.sync/ldmatrix for small 16-bit windows, tile kernels with tensor-core WMMA and SIMT, vectorised and scalar loads, the feature-map path with shift, multi-window bias-gradient
slots, several key chunks), head-mixing attention (one and several key tiles, tensor-core
and SIMT, more than 16 heads, accumulators in global scratch), top-k softmax (staged/unstaged rows, ties, NaN rows), the sparse
soft-target CE and the covariance update. It does not replace the GPU run (timing, the real memory
model, compute-sanitizer)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import SEED
from test_soft_target_ce import GRAD_TOL as CE_GRAD_TOL
from test_window_attention import GRAD_TOL, OUT_TOL

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "cuda_emulation"))
from run_cases import HEAD_MIX_CASES, KERNEL_CASES, WINDOW_CASES  # noqa: E402


@pytest.fixture(scope="module")
def results():
    # The emulator's scheduler (which thread runs next, which block first, when a cp.async lands)
    # follows the run's test seed: each run tries other interleavings, and VITFAST_TEST_SEED
    # replays one.
    env = {**os.environ, "VITFAST_EMU_SEED": str(SEED + 1)}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cuda_emulation", "run_cases.py")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_emulated_window_attention_matches_reference(results, name):
    dtype = WINDOW_CASES[name][0]
    r = results[name]
    assert r["out"] < OUT_TOL[dtype], r
    assert r["grad_qkv"] < GRAD_TOL[dtype], r
    # the table is float32 (float64 with float64 inputs); its gradient sums rounded dS terms
    if WINDOW_CASES[name][1].get("bias", True):
        assert r["grad_table"] < GRAD_TOL[dtype], r
    assert r["deterministic"] == 1.0, r  # bitwise equal gradients over two backward runs
    assert r["route"] == window_route(*WINDOW_CASES[name]), r


def window_route(dtype, kw):
    """The kernels a case must have run: register kernels for 16-bit windows of <= 64 tokens and
    head dims <= 64 unless the case forces the tile kernels."""
    if "route" in kw:
        return kw["route"]
    dk = kw.get("dk", 32)
    dv = kw.get("dv") or dk
    n = kw.get("wh", 7) * kw.get("ww", 7)
    small = dtype in (torch.float16, torch.bfloat16) and n <= 64 and max(dk, dv) <= 64
    return "registers" if small else "tiles"


def test_emulated_window_cases_cover_both_kernel_families():
    routes = {window_route(*case) for case in WINDOW_CASES.values()}
    assert routes == {"registers", "tiles"}


@pytest.mark.parametrize("name", list(HEAD_MIX_CASES))
def test_emulated_head_mix_attention_matches_reference(results, name):
    dtype = HEAD_MIX_CASES[name][0]
    r = results[name]
    assert r["out"] < OUT_TOL[dtype], r
    for key in ("grad_qkv", "grad_table", "grad_pre_mix", "grad_post_mix", "grad_post_mix_bias"):
        if key in r:
            assert r[key] < GRAD_TOL[dtype], (key, r)
    assert r["deterministic"] == 1.0, r  # bitwise equal gradients over two backward runs
    if head_mix_route(*HEAD_MIX_CASES[name]) in ("registers", "stream", "stream+tiles"):
        assert r["routes"] == head_mix_route(*HEAD_MIX_CASES[name]), r
    else:  # the case meant to run every accumulator from global scratch does
        want = "global" if "global_scratch" in name else "smem"
        assert r["routes"] == f"fwd:{want},bwd_q:{want},bwd_kv:{want}", r


def head_mix_route(dtype, kw, opts):
    """Register kernels for 16-bit windows of <= 64 tokens, head dims <= 32 and 3 or 4 heads
    (head_mix_reg_rule.h); else the streaming forward for 16-bit 3/4/6/8/12 heads of <= 64
    channels (head_mix_stream_rule.h) or the head-split forward for 16 heads of <= 64 and 24 of
    <= 32, with the streaming backward ("stream": 12 heads of more than 32 channels and 16 of <= 32
    on the head-split kernels; the emulated device's 4 SMs leave its table-gradient sums small) or
    the tile backward ("stream+tiles": 16 heads of more than 32, 24 heads, or when a case asks for
    it); else the tile kernels. A case may force the tile kernels, or the tile backward
    behind the streaming forward."""
    dk = kw.get("dk", 32)
    dv = kw.get("dv") or dk
    n = kw.get("wh", 7) * kw.get("ww", 7)
    heads = kw.get("heads", 3)
    half = dtype in (torch.float16, torch.bfloat16) and opts.get("route") != "tiles"
    # 4 heads fit the register backward's shared memory (227 KB) up to 55 tokens, 3 heads up to 64
    if half and n <= 64 and max(dk, dv) <= 32 and (heads == 3 or (heads == 4 and n <= 55)):
        return "registers"
    wide = max(dk, dv) > 32
    if half and max(dk, dv) <= 64 and (heads in (3, 4, 6, 8, 12, 16) or (heads == 24 and not wide)):
        # 16 heads of 48-64 and 24 heads: the head-split forward with the tile backward
        stream_bwd = heads in (3, 4, 6, 8, 12) or (heads == 16 and not wide)
        return "stream" if stream_bwd and opts.get("stream_bwd", True) else "stream+tiles"
    return "tiles"


def test_emulated_head_mix_cases_cover_both_kernel_families():
    routes = {head_mix_route(*case) for case in HEAD_MIX_CASES.values()}
    assert routes == {"registers", "stream", "stream+tiles", "tiles"}
    # the streaming forward's cases (either backward) cover both dtypes, both padded head dims,
    # sequences and shifted windows, the mixed bias (table, mask) and none, vector and scalar loads
    stream = [c for c in HEAD_MIX_CASES.values() if head_mix_route(*c) in ("stream", "stream+tiles")]
    assert {c[0] for c in stream} == {torch.float16, torch.bfloat16}
    assert {32 if max(c[1]["dk"], c[1].get("dv") or c[1]["dk"]) <= 32 else 64 for c in stream} == {32, 64}
    assert any(c[1].get("wh") == 1 for c in stream) and any(c[1].get("shift") for c in stream)
    assert any(c[1].get("mask_types") for c in stream) and any(c[1].get("bias") is False for c in stream)
    assert any(c[1].get("row_pad") for c in stream) and any(not c[1].get("row_pad") for c in stream)
    # the streaming backward's cases: every head count, both dtypes and padded head dims, scalar
    # loads, more items than the emulated device's resident blocks (its query-major kernel loops),
    # table and mask (in both dtypes), table alone, mask alone, neither, shifted windows
    sb = [c for c in HEAD_MIX_CASES.values() if head_mix_route(*c) == "stream"]
    assert {c[1]["heads"] for c in sb} == {3, 4, 6, 8, 12, 16} and {c[0] for c in sb} == {torch.float16, torch.bfloat16}
    # the head-split forward: 16 and 24 heads, both dtypes, both padded head dims, table + mask and
    # neither, scalar loads, a sequence; and DeiT-B's 12 heads of 64 on request
    split = [c for c in HEAD_MIX_CASES.values() if c[1]["heads"] in (16, 24) and head_mix_route(*c) != "tiles"]
    assert {c[1]["heads"] for c in split} == {16, 24} and {c[0] for c in split} == {torch.float16, torch.bfloat16}
    assert {32 if max(c[1]["dk"], c[1].get("dv") or c[1]["dk"]) <= 32 else 64 for c in split} == {32, 64}
    assert any(c[1].get("mask_types") for c in split) and any(c[1].get("bias") is False for c in split)
    assert any(c[1].get("row_pad") for c in split) and any(c[1].get("wh") == 1 for c in split)
    assert any(c[2].get("split_fwd") and c[1]["heads"] == 12 and c[1]["dk"] > 32 for c in HEAD_MIX_CASES.values())
    # 12 heads of <= 32 channels (halves, mixing gradients in passes) and of 48-64 (the head-split
    # kernels): both dtypes, table + mask and neither, scalar loads, items looping per block
    def wide(c):
        return max(c[1]["dk"], c[1].get("dv") or c[1]["dk"]) > 32

    for h12 in ([c for c in sb if c[1]["heads"] == 12 and not wide(c)], [c for c in sb if c[1]["heads"] == 12 and wide(c)]):
        assert {c[0] for c in h12} == {torch.float16, torch.bfloat16} and any(c[1].get("row_pad") for c in h12)
        assert any(c[1].get("mask_types") for c in h12) and any(c[1].get("bias") is False for c in h12)
        assert any(c[1].get("grid", (0, 0, 0))[0] * 4 > 4 for c in h12)
        assert any(c[1].get("wh") == 1 for c in h12)
    assert {32 if max(c[1]["dk"], c[1].get("dv") or c[1]["dk"]) <= 32 else 64 for c in sb} == {32, 64}
    assert any(c[1].get("row_pad") for c in sb)
    assert any(c[1].get("windows", 4) * -(-c[1]["wh"] * c[1]["ww"] // 64) > 8 for c in sb)
    table = [c for c in sb if c[1].get("bias", True)]
    assert {c[0] for c in table if c[1].get("mask_types")} == {torch.float16, torch.bfloat16}
    assert any(not c[1].get("mask_types") for c in table) and any(c[1].get("shift") for c in table)
    assert any(c[1].get("mask_types") and c[1].get("bias") is False for c in sb)
    assert any(c[1].get("windows", 4) > 8 for c in table)  # table sums over items looping per block
    # and the register cases cover both head counts, both 16-bit dtypes, vector and scalar loads
    reg = [c for c in HEAD_MIX_CASES.values() if head_mix_route(*c) == "registers"]
    assert {c[1]["heads"] for c in reg} == {3, 4}
    assert {c[0] for c in reg} == {torch.float16, torch.bfloat16}
    assert any(c[1].get("row_pad") for c in reg) and any(not c[1].get("row_pad") for c in reg)


@pytest.mark.parametrize("name", [n for n in KERNEL_CASES if n.startswith("topk")])
def test_emulated_topk_softmax_matches_reference(results, name):
    r = results[name]
    assert r["indices_equal"] == 1.0 and r["nan_rows_equal"] == 1.0, r
    assert r["values"] < 1e-3, r  # fp16 values: one rounding


@pytest.mark.parametrize("name", [n for n in KERNEL_CASES if n.startswith("ce")])
def test_emulated_soft_target_ce_matches_reference(results, name):
    r = results[name]
    dtype = KERNEL_CASES[name][0]
    assert r["loss"] < (1e-12 if dtype == torch.float64 else 1e-5), r
    assert r["grad"] < CE_GRAD_TOL[dtype], r


@pytest.mark.parametrize("name", [n for n in KERNEL_CASES if n.startswith("dense_ce")])
def test_emulated_dense_soft_target_ce_matches_reference(results, name):
    r = results[name]
    dtype = KERNEL_CASES[name][0]
    if "without_distribution" in name:  # NaN rows where the reference has them, the rest matching
        assert r["nan_rows_40"] == r["nan_rows_2000"] == 1.0, r
        assert max(r["loss_40"], r["loss_2000"]) < 1e-5 and max(r["grad_40"], r["grad_2000"]) < 1e-5, r
        return
    assert r["loss_dtype_ok"] == 1.0, r
    # float32 math on the device (float64 when either side is): __expf's few ulp on the loss
    assert r["loss"] < (1e-12 if dtype == torch.float64 else 1e-5), r
    if "no_grad" in name:
        assert r["grad"] == 1.0, r  # no gradient tensor when none is wanted
    else:
        assert r["grad"] < CE_GRAD_TOL[dtype], r


@pytest.mark.parametrize("name", [n for n in KERNEL_CASES if n.startswith("cov")])
def test_emulated_covariance_matches_reference(results, name):
    r = results[name]
    assert r["count"] == 1.0 and r["mean"] < 1e-12 and r["m2"] < 1e-5, r
    # the route each case is meant to exercise (auto: split GEMM on sm_80+ for m >= 128)
    route = "split_gemm" if "split_gemm" in name else "simt" if "simt" in name else "tensor_core"
    assert r["route"] == route, r


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    """tests/cuda_emulation/emulator_selftest.cpp, built with the C++ compiler the emulator build
    uses (g++, C++20)."""
    exe = str(tmp_path_factory.mktemp("emu") / "emulator_selftest")
    src = os.path.join(HERE, "cuda_emulation", "emulator_selftest.cpp")
    proc = subprocess.run([os.environ.get("CXX", "g++"), "-O1", "-std=c++20", "-w",
                           "-I", os.path.join(os.path.dirname(HERE), "csrc"), src, "-o", exe],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def run_selftest(exe, mode, seed):
    env = {**os.environ, "VITFAST_EMU_SEED": str(seed)}
    return subprocess.run([exe, mode], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("seed", [SEED + 1, SEED + 2, SEED + 3])
def test_emulator_passes_a_correct_kernel(selftest, seed):
    proc = run_selftest(selftest, "ok", seed)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "ok", "ok"], (proc.stdout, proc.stderr)


@pytest.mark.parametrize("seed", [SEED + 1, SEED + 2, SEED + 3])
@pytest.mark.parametrize("mode", ["war", "raw", "shuffle"])
def test_emulator_catches_a_missing_barrier_or_wait(selftest, mode, seed):
    """A buffer refilled while others read it (no barrier before the cp.async issue), a tile read
    before its copies are waited for, a warp neighbour's slot read without __syncwarp: each gives
    a wrong result under every scheduler seed, not only under an unlucky thread order."""
    proc = run_selftest(selftest, mode, seed)
    assert proc.returncode == 1 and proc.stdout.strip() == "wrong", (proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def selftest_asan(tmp_path_factory):
    """The self-test built with AddressSanitizer, as scripts/emulator_memcheck.sh builds the
    emulator's binding: the emulator's memcheck on the CPU."""
    exe = str(tmp_path_factory.mktemp("emu_asan") / "emulator_selftest_asan")
    src = os.path.join(HERE, "cuda_emulation", "emulator_selftest.cpp")
    proc = subprocess.run([os.environ.get("CXX", "g++"), "-O1", "-std=c++20", "-w", "-fsanitize=address",
                           "-fno-omit-frame-pointer", "-I", os.path.join(os.path.dirname(HERE), "csrc"), src,
                           "-o", exe], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "asan" in proc.stderr.lower():
        pytest.skip(f"this compiler cannot link AddressSanitizer: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return exe


def test_emulator_under_asan_runs_a_correct_kernel_clean(selftest_asan):
    """Fiber stacks switched in user space, exact-size shared memory: no false report."""
    proc = run_selftest(selftest_asan, "ok", SEED + 1)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "ok", "ok"], (proc.stdout, proc.stderr[-3000:])
    assert "AddressSanitizer" not in proc.stderr


@pytest.mark.parametrize("mode,kernel,access", [("smem_overflow", "smem_store", "WRITE"),
                                                ("global_overflow", "shifted_copy", "READ")])
def test_emulator_under_asan_reports_an_out_of_bounds_access(selftest_asan, mode, kernel, access):
    """One float past the end of the launch's dynamic shared memory (inside what used to be the
    buffer's alignment slack) or of a global buffer: reported, naming the kernel."""
    proc = run_selftest(selftest_asan, mode, SEED + 1)
    assert proc.returncode != 0
    assert "heap-buffer-overflow" in proc.stderr and f"{access} of size 4" in proc.stderr, proc.stderr[-3000:]
    assert kernel in proc.stderr


def test_emulator_reports_a_barrier_deadlock(selftest):
    proc = run_selftest(selftest, "deadlock", SEED + 1)
    assert proc.returncode != 0
    assert "deadlock: 63 of 64 threads" in proc.stderr and "never reach" in proc.stderr, proc.stderr
