"""The CPU attention kernels' instruction-set variants (csrc/common/cpu_isa.h): each variant this
CPU runs (baseline x86-64, AVX2, AVX-512; chosen with VITFAST_CPU_ISA) against the float64
reference, with shapes whose padding and query-row blocks differ between the variants' tile
widths; and the variable's checks."""
import pytest
import torch

import vitfast
from vitfast.ops import head_mix_attention

import test_head_mix_attention as hm
import test_window_attention as wa

if not vitfast.extension_loaded():
    pytest.skip("the CPU kernels' variants need the compiled extension", allow_module_level=True)

ORDER = ("base", "avx2", "avx512")
SUPPORTED = vitfast.build_info()["cpu_isa"]
# every variant this CPU can run (a request above that silently gives the best one: no new case)
ISAS = ORDER[:ORDER.index(SUPPORTED) + 1]

WINDOW_SHAPES = [
    dict(windows=3, heads=3, dk=32, wh=7, ww=7, mask_types=3),    # Swin: 49 tokens, a partial row block
    dict(windows=2, heads=2, dk=24, dv=40, wh=10, ww=10, layout="tinyvit"),  # head dims off every tile width
    dict(windows=2, heads=1, dk=8, wh=1, ww=3, bias=False),       # fewer tokens than a register tile
]
MIX_SHAPES = WINDOW_SHAPES + [
    dict(windows=1, heads=3, dk=64, wh=1, ww=197, bias=False),   # Mini-DeiT-Ti
    dict(windows=1, heads=8, dk=16, wh=1, ww=900, bias=False),   # long: the backward's row blocks shrink
]


def test_build_reports_the_cpu_isa():
    assert SUPPORTED in ORDER


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", WINDOW_SHAPES, ids=lambda s: f"{s['heads']}x{s['wh'] * s['ww']}x{s['dk']}")
def test_window_attention_variant_matches_reference(monkeypatch, isa, dtype, shape):
    monkeypatch.setenv("VITFAST_CPU_ISA", isa)
    wa.run_and_compare(wa.make_case("cpu", dtype, **shape), dtype, impl="fused")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", MIX_SHAPES, ids=lambda s: f"{s['heads']}x{s['wh'] * s['ww']}x{s['dk']}")
def test_head_mix_variant_matches_reference(monkeypatch, isa, dtype, shape):
    if shape["ww"] == 900 and dtype == torch.bfloat16:
        pytest.skip("the long case checks the row blocks of the 32- and 64-bit accumulators")
    monkeypatch.setenv("VITFAST_CPU_ISA", isa)
    case = wa.make_case("cpu", dtype, **shape)
    hm.run_and_compare(case, hm.make_mix(case["heads"], "cpu", dtype=hm.param_dtype(dtype)), dtype)


def test_variants_agree_to_rounding(monkeypatch):
    """Same inputs through every variant: float64 results agree to rounding (the variants differ in
    tile widths, so in summation order, not in what they compute)."""
    if len(ISAS) < 2:
        pytest.skip(f"this CPU runs only the {SUPPORTED} variant")
    case = wa.make_case("cpu", torch.float64, windows=2, heads=3, dk=32, wh=7, ww=7, mask_types=2)
    mix = hm.make_mix(3, "cpu", dtype=torch.float64)
    results = []
    for isa in ISAS:
        monkeypatch.setenv("VITFAST_CPU_ISA", isa)
        results.append(hm.fused_grads(case, mix))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["window", "head_mix"])
def test_unknown_isa_is_named(monkeypatch, op):
    monkeypatch.setenv("VITFAST_CPU_ISA", "sse9")
    qkv = torch.randn(2, 16, 3 * 2 * 8)
    with pytest.raises((RuntimeError, ValueError), match="VITFAST_CPU_ISA.*sse9"):
        if op == "window":
            vitfast.window_attention(qkv, 2, 8)
        else:
            head_mix_attention(qkv, 2, 8, pre_mix=torch.eye(2), impl="fused")
