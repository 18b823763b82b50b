"""window_attention against the float64 reference: outputs, q/k/v and table gradients, every
layout (windows, feature map with shift, Swin and TinyViT channel packing, strided qkv),
gradcheck, registration, torch.compile, determinism and bad input."""
import importlib

import pytest
import torch

from vitfast.ops import qkv_layout, window_attention
from vitfast.ops.reference import window_attention_reference
from vitfast.ops.window_attention import auto_impl

from conftest import HAS_CUDA, rel_err

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# relative error (norm) against float64: inputs rounded to the dtype, fp32 accumulation; P and dS
# are rounded to 16 bits before their products on the GPU
OUT_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-11}
GRAD_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4, torch.float64: 1e-10}


def swin_index(wh, ww):
    """Swin's relative_position_index for a wh x ww window (table length (2wh-1)(2ww-1))."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1


def make_case(device, dtype, *, windows=4, heads=3, dk=32, dv=None, wh=7, ww=7, layout="swin", bias=True,
              mask_types=0, grid=None, shift=(0, 0), row_pad=0):
    """Random qkv (optionally a view with padded rows), table, index, mask."""
    dv = dk if dv is None else dv
    n = wh * ww
    offsets, head_stride = qkv_layout(layout, heads, dk, dv)
    channels = max(o for o in offsets) + (heads - 1) * head_stride + max(dk, dv)
    channels = heads * (2 * dk + dv) if layout in ("swin", "tinyvit") else channels
    lead = (grid[0], grid[1], grid[2]) if grid else (windows, n)
    full = torch.randn(*lead, channels + row_pad, device=device) * 2
    qkv = full[..., :channels].to(dtype) if row_pad else full.to(dtype)
    table = index = mask = None
    if bias:
        length = (2 * wh - 1) * (2 * ww - 1)
        # float32 parameters with 16-bit activations, as under autocast
        table = torch.randn(heads, length, device=device, dtype=torch.float64 if dtype == torch.float64 else None)
        index = swin_index(wh, ww).to(device)
    if mask_types:
        mask = torch.where(torch.rand(mask_types, n, n, device=device) < 0.3, -100.0, 0.0)
        mask.diagonal(dim1=1, dim2=2).zero_()
    return dict(qkv=qkv, heads=heads, dk=dk, dv=dv, layout=layout, table=table, index=index, mask=mask,
                window_size=(wh, ww) if grid else None, shift=shift)


def run_and_compare(case, dtype, impl="auto"):
    qkv = case["qkv"].detach().clone().requires_grad_()
    table = case["table"].clone().requires_grad_() if case["table"] is not None else None
    kw = dict(layout=case["layout"], bias_table=table, bias_index=case["index"], mask=case["mask"], impl=impl)
    if case["window_size"]:
        kw.update(window_size=case["window_size"], shift_size=case["shift"])
    out = window_attention(qkv, case["heads"], case["dk"], case["dv"], **kw)
    assert out.dtype == dtype and out.shape == (*qkv.shape[:-1], case["heads"] * case["dv"])
    grad = torch.randn_like(out)
    inputs = [qkv] + ([table] if table is not None else [])
    grads = torch.autograd.grad(out, inputs, grad)

    qkv64 = case["qkv"].detach().cpu().double().requires_grad_()
    table64 = case["table"].detach().cpu().double().requires_grad_() if table is not None else None
    offsets, head_stride = qkv_layout(case["layout"], case["heads"], case["dk"], case["dv"])
    ref = window_attention_reference(
        qkv64, case["heads"], case["dk"], case["dv"], offsets, head_stride, case["dk"] ** -0.5, table64,
        None if case["index"] is None else case["index"].cpu(), None if case["mask"] is None else case["mask"].cpu(),
        case["window_size"] or (), case["shift"] if case["window_size"] else ())
    ref_grads = torch.autograd.grad(ref, [qkv64] + ([table64] if table is not None else []), grad.cpu().double())
    assert rel_err(out.cpu(), ref) < OUT_TOL[dtype]
    assert grads[0].dtype == dtype and grads[0].shape == qkv.shape
    assert rel_err(grads[0].cpu(), ref_grads[0]) < GRAD_TOL[dtype]
    if table is not None:
        assert grads[1].dtype == table.dtype and grads[1].shape == table.shape
        if ref_grads[1].abs().max() == 0:  # one token per window: the bias cannot matter
            # rounding only (dS = P (dP - D), dP and D rounded apart): relative to the gradients' scale
            scale = max(ref_grads[0].abs().max().item(), 1.0)
            assert grads[1].abs().max() < GRAD_TOL[dtype] * scale
        else:
            assert rel_err(grads[1].cpu(), ref_grads[1]) < GRAD_TOL[dtype]
    if impl == "auto" and auto_impl(qkv, case["dk"], case["dv"], case["window_size"]) != "fused":
        run_and_compare(case, dtype, impl="fused")  # auto took SDPA: vitfast's own kernels on this shape too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    dict(windows=6, heads=3, dk=32, wh=7, ww=7, mask_types=3),        # Swin-T stage 1, shifted
    dict(windows=3, heads=4, dk=32, wh=12, ww=12),                    # Swin @384
    dict(windows=2, heads=5, dk=16, dv=64, wh=14, ww=14, layout="tinyvit"),  # TinyViT, attn_ratio 4
    dict(windows=2, heads=2, dk=64, wh=5, ww=3, bias=False),
    dict(windows=5, heads=1, dk=24, dv=40, wh=1, ww=1, layout="tinyvit"),  # one token
    dict(windows=1, heads=2, dk=128, wh=4, ww=4),
])
def test_windows_match_reference(device, dtype, shape):
    run_and_compare(make_case(device, dtype, **shape), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_large_window(device, dtype):
    """TinyViT-512's stage 3: 32 x 32 = 1024-token windows (several key chunks on the GPU)."""
    run_and_compare(make_case(device, dtype, windows=1, heads=2, dk=32, wh=32, ww=32), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid,window,shift", [
    ((2, 14, 21), (7, 7), (3, 3)),   # Swin shifted block: roll + partition as index arithmetic
    ((1, 14, 14), (7, 7), (0, 0)),
    ((3, 8, 12), (4, 6), (1, 5)),    # rectangular windows, unequal shifts
    ((2, 14, 14), (14, 14), (0, 0)),  # one window per map (TinyViT stage 3)
])
def test_feature_map_matches_reference(device, dtype, grid, window, shift):
    mask_types = (grid[1] // window[0]) * (grid[2] // window[1]) if any(shift) else 0
    case = make_case(device, dtype, grid=grid, wh=window[0], ww=window[1], shift=shift, mask_types=mask_types)
    run_and_compare(case, dtype)


@pytest.mark.parametrize("layout", ["swin", "tinyvit"])
def test_strided_qkv_rows(device, layout):
    """qkv as a view with padded rows (any row stride) needs no copy and gives the same result."""
    run_and_compare(make_case(device, torch.float32, layout=layout, row_pad=5, mask_types=2), torch.float32)
    run_and_compare(make_case(device, torch.float32, layout=layout, grid=(2, 7, 14), row_pad=3), torch.float32)


def test_explicit_layout_with_channel_gaps(device):
    """(q, k, v) offsets that leave unused channels: their gradient is zero."""
    heads, d = 2, 16
    layout = (8, 8 + heads * 24, 8 + 2 * heads * 24, 24)  # 8 leading channels, 8 spare per head
    qkv = torch.randn(3, 9, 8 + 3 * heads * 24, device=device, dtype=torch.float64, requires_grad=True)
    out = window_attention(qkv, heads, d, layout=layout)
    offsets, hs = qkv_layout(layout, heads, d, d)
    ref = window_attention_reference(qkv, heads, d, d, offsets, hs, d ** -0.5)
    assert rel_err(out, ref) < 1e-11
    (g,) = torch.autograd.grad(out.sum(), qkv)
    (rg,) = torch.autograd.grad(ref.sum(), qkv)
    assert rel_err(g, rg) < 1e-10 and torch.count_nonzero(g[..., :8]) == 0


def test_gradcheck_cpu():
    case = make_case("cpu", torch.float64, windows=2, heads=2, dk=4, dv=3, wh=2, ww=3, layout="tinyvit",
                     mask_types=2)
    qkv = case["qkv"].detach().requires_grad_()
    table = case["table"].detach().requires_grad_()

    def fn(qkv, table):
        return window_attention(qkv, 2, 4, 3, layout="tinyvit", bias_table=table, bias_index=case["index"],
                                mask=case["mask"])

    assert torch.autograd.gradcheck(fn, (qkv, table))
    grid = make_case("cpu", torch.float64, grid=(1, 4, 6), heads=1, dk=3, wh=2, ww=3, shift=(1, 2), mask_types=4)
    x = grid["qkv"].detach().requires_grad_()
    t = grid["table"].detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, t: window_attention(x, 1, 3, bias_table=t, bias_index=grid["index"], mask=grid["mask"],
                                      window_size=(2, 3), shift_size=(1, 2)), (x, t))


def test_opcheck(device):
    case = make_case(device, torch.float32, windows=4, heads=2, dk=16, wh=3, ww=3, mask_types=2)
    offsets, hs = qkv_layout("swin", 2, 16, 16)
    args = (case["qkv"].requires_grad_(), case["table"].requires_grad_(), case["index"], case["mask"], 2, 16, 16,
            offsets, hs, 0.25, [], [])
    torch.library.opcheck(torch.ops.vitfast.window_attention_forward.default, args)
    grid = make_case(device, torch.float32, grid=(2, 6, 6), heads=2, dk=16, wh=3, ww=3, shift=(1, 1), mask_types=4)
    args = (grid["qkv"], grid["table"], grid["index"], grid["mask"], 2, 16, 16, offsets, hs, 0.25, [3, 3], [1, 1])
    torch.library.opcheck(torch.ops.vitfast.window_attention_forward.default, args)
    out, lse = torch.ops.vitfast.window_attention_forward(*args)
    torch.library.opcheck(torch.ops.vitfast.window_attention_backward.default,
                          (torch.randn_like(out), grid["qkv"], out, lse) + args[1:] + (True,))


def test_torch_compile_fullgraph(device):
    case = make_case(device, torch.float32, windows=4, heads=2, dk=16, wh=4, ww=4, mask_types=2)
    proj = torch.nn.Linear(32, 8).to(device)

    def step(qkv, table):
        out = window_attention(qkv, 2, 16, bias_table=table, bias_index=case["index"], mask=case["mask"])
        return proj(out).square().mean()

    qkv = case["qkv"].clone().requires_grad_()
    table = case["table"].clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(qkv, table)
    loss.backward()
    qkv2 = case["qkv"].clone().requires_grad_()
    table2 = case["table"].clone().requires_grad_()
    ref = step(qkv2, table2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(qkv.grad, qkv2.grad)
    torch.testing.assert_close(table.grad, table2.grad)


@pytest.mark.parametrize("mode", [False, True])
def test_gradients_bitwise_reproducible(device, mode):
    """Same inputs, same bits, with or without torch.use_deterministic_algorithms."""
    case = make_case(device, torch.bfloat16 if device.type == "cuda" else torch.float32, windows=64, heads=3,
                     dk=32, mask_types=4)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode)
    try:
        grads = []
        for _ in range(3):
            table = case["table"].clone().requires_grad_()
            qkv = case["qkv"].clone().requires_grad_()
            out = window_attention(qkv, 3, 32, bias_table=table, bias_index=case["index"], mask=case["mask"])
            grads.append(torch.autograd.grad(out.float().square().sum(), (qkv, table)))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(grads[0][0], g[0]) and torch.equal(grads[0][1], g[1]) for g in grads[1:])


def test_int32_index_and_table_dtypes(device):
    """int32 index; a float32 table with bf16 activations (autocast's mix) and a float64 one."""
    case = make_case(device, torch.float32, mask_types=2)
    case["index"] = case["index"].int()
    run_and_compare(case, torch.float32)
    case = make_case(device, torch.float32)
    case["table"] = case["table"].double()
    run_and_compare(case, torch.float32)


def test_fully_masked_row_is_nan_like_softmax(device):
    qkv = torch.randn(2, 4, 3 * 8, device=device)
    mask = torch.zeros(1, 4, 4, device=device)
    mask[0, 1] = float("-inf")
    out = window_attention(qkv, 1, 8, mask=mask)
    ref = window_attention_reference(qkv.double().cpu(), 1, 8, 8, [0, 8, 16], 8, 8 ** -0.5, mask=mask.double().cpu())
    assert torch.isnan(out[:, 1]).all() and torch.isnan(ref[:, 1]).all()
    torch.testing.assert_close(out[:, [0, 2, 3]].cpu().double(), ref[:, [0, 2, 3]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,exc,words", [
    (dict(qkv=torch.zeros(2, 4, 24, dtype=torch.int32)), TypeError, "'qkv'"),
    (dict(qkv=torch.zeros(2, 24)), ValueError, "'qkv'"),
    (dict(num_heads=0), ValueError, "'num_heads'"),
    (dict(dim_k=300, layout="tinyvit"), ValueError, "'dim_k'"),
    (dict(layout=(0, 4, 16, 24)), ValueError, "overlaps"),
    (dict(layout=(0, 8, 20, 24)), ValueError, "outside"),
    (dict(bias_table=torch.zeros(2, 9)), ValueError, "'bias_index'"),
    (dict(bias_table=torch.zeros(3, 9), bias_index=torch.zeros(4, 4, dtype=torch.long)), ValueError, "'bias_table'"),
    (dict(bias_table=torch.zeros(1, 9), bias_index=torch.zeros(4, 4)), TypeError, "'bias_index'"),
    (dict(bias_table=torch.zeros(1, 9), bias_index=torch.zeros(3, 3, dtype=torch.long)), ValueError, "'bias_index'"),
    (dict(bias_table=torch.zeros(1, 9), bias_index=torch.full((4, 4), 9)), ValueError, "'bias_index'"),
    (dict(mask=torch.zeros(3, 4, 4)), ValueError, "'mask'"),
    (dict(mask=torch.zeros(1, 4, 5)), ValueError, "'mask'"),
    (dict(qkv=torch.zeros(1, 4, 6, 24), window_size=(3, 4)), ValueError, "'window_size'"),
    (dict(qkv=torch.zeros(1, 4, 6, 24), window_size=(2, 3), shift_size=(4, 0)), ValueError, "'shift_size'"),
    (dict(qkv=torch.zeros(1, 4, 6, 24), window_size=(2, 3), mask=torch.zeros(3, 6, 6)), ValueError, "'mask'"),
    (dict(impl="flash"), ValueError, "'impl'"),
])
@pytest.mark.parametrize("impl", ["auto", "sdpa"])
def test_bad_arguments_are_named(bad, exc, words, op_path, impl):
    kw = dict(qkv=torch.zeros(2, 4, 24), num_heads=1, dim_k=8, layout="swin", impl=impl)
    kw.update(bad)
    qkv, heads, dk = kw.pop("qkv"), kw.pop("num_heads"), kw.pop("dim_k")
    with pytest.raises(exc, match=words):
        window_attention(qkv, heads, dk, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    dict(windows=6, heads=3, dk=32, wh=7, ww=7, mask_types=3),
    dict(windows=2, heads=5, dk=16, dv=64, wh=14, ww=14, layout="tinyvit"),
    dict(grid=(2, 14, 21), wh=7, ww=7, shift=(3, 3), mask_types=6),
    dict(windows=3, heads=2, dk=24, dv=40, wh=3, ww=5, layout="tinyvit", row_pad=3, bias=False),
])
def test_sdpa_impl_matches_reference(device, dtype, shape):
    """impl="sdpa": scaled_dot_product_attention with the gathered bias, in qkv's dtype (the
    shift mask broadcast over window groups, not copied per window)."""
    run_and_compare(make_case(device, dtype, **shape), dtype, impl="sdpa")


def test_auto_impl_rule():
    """auto: vitfast's kernels everywhere except 16-bit CUDA shapes the register kernels do not
    take (there SDPA measured faster than the tile kernels)."""
    class Fake:  # device and dtype are all the rule reads, besides the shape
        def __init__(self, device, dtype, shape):
            self.device, self.dtype, self.shape = torch.device(device), dtype, shape

        def dim(self):
            return len(self.shape)

    bf16, f32 = torch.bfloat16, torch.float32
    assert auto_impl(Fake("cpu", bf16, (8, 196, 288)), 32, 32, None) == "fused"
    assert auto_impl(Fake("cuda", f32, (8, 196, 288)), 32, 32, None) == "fused"
    assert auto_impl(Fake("cuda", bf16, (8, 49, 288)), 32, 32, None) == "fused"
    assert auto_impl(Fake("cuda", bf16, (8, 64, 384)), 64, 64, None) == "fused"
    assert auto_impl(Fake("cuda", bf16, (8, 196, 288)), 32, 32, None) == "sdpa"   # TinyViT stage 3
    assert auto_impl(Fake("cuda", bf16, (8, 49, 768)), 128, 128, None) == "sdpa"  # head dim 128
    assert auto_impl(Fake("cuda", bf16, (2, 24, 24, 288)), 32, 32, [12, 12]) == "sdpa"  # Swin @384 map
    assert auto_impl(Fake("cuda", bf16, (2, 56, 56, 288)), 32, 32, [7, 7]) == "fused"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_matches_cpu_kernel_bitwise_layout():
    """Same inputs on both devices: outputs agree to fp32 rounding (one shared addressing scheme)."""
    case = make_case("cpu", torch.float32, grid=(2, 14, 14), wh=7, ww=7, shift=(3, 3), mask_types=4)
    kw = dict(bias_table=case["table"], bias_index=case["index"], mask=case["mask"], window_size=(7, 7),
              shift_size=(3, 3))
    cpu = window_attention(case["qkv"], 3, 32, **kw)
    gpu = window_attention(case["qkv"].cuda(), 3, 32, **{k: (v.cuda() if torch.is_tensor(v) else v)
                                                          for k, v in kw.items()})
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fits", [(False, False), (True, False)], ids=["forward_too", "backward_only"])
def test_shapes_the_kernels_cannot_hold_run_the_composite(monkeypatch, dtype, fits):
    """Where the fused kernels have no launch configuration (the H100 run: float64 with head dim
    128), the op still answers: the forward, or only the backward, runs the float32-or-wider
    composite, with one warning per shape, and matches float64."""
    from vitfast import _ext
    from vitfast.ops import _composite

    asked = []
    monkeypatch.setattr(_ext, "window_attention_fits", lambda *a: asked.append(a) or fits)
    monkeypatch.setattr(_composite, "_warned", set())
    case = make_case("cpu", dtype, windows=3, heads=2, dk=8, wh=3, ww=3, mask_types=3)
    with pytest.warns(RuntimeWarning, match="composite") as seen:
        run_and_compare(case, dtype)
        run_and_compare(case, dtype)
    msgs = [str(w.message) for w in seen if "composite" in str(w.message)]
    assert len(msgs) == 1 and ("fused CUDA forward" if not fits[0] else "fused CUDA backward") in msgs[0]
    assert asked and asked[0][1:5] == (dtype, 2, 8, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_kernel_fit_query_on_gpu():
    """float64 with head dim 128 has no fused configuration on an H100 (measured: the process died
    there before the composite route existed); Swin's bf16 shapes do."""
    from vitfast import _ext

    assert _ext.window_attention_fits(torch.device("cuda"), torch.float64, 2, 128, 128, True) != (True, True)
    assert _ext.window_attention_fits(torch.device("cuda"), torch.bfloat16, 3, 32, 32, True) == (True, True)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    dict(windows=1440, heads=3, dk=32, wh=7, ww=7, mask_types=4),  # more windows than bias-gradient slots
    dict(windows=6, heads=2, dk=64, wh=8, ww=8, mask_types=2),     # 64 tokens, head dim 64
    dict(windows=4, heads=3, dk=16, dv=64, wh=7, ww=7, layout="tinyvit"),
    dict(windows=3, heads=2, dk=40, wh=4, ww=5, bias=False),        # head dim not /16, 20 tokens
])
def test_register_and_tile_kernels_both_match_reference(monkeypatch, dtype, shape):
    """16-bit windows of <= 64 tokens run the register kernels by default; forced onto the tile
    kernels the same case must agree with float64 too, and the register backward is bitwise
    reproducible (bias gradient summed over slots in a fixed order)."""
    from vitfast import _ext

    case = make_case("cuda", dtype, **shape)
    n = shape["wh"] * shape["ww"]
    dv = shape.get("dv", shape["dk"])
    assert _ext.window_attention_route(torch.device("cuda"), dtype, n, shape["heads"], shape["dk"], dv) == "registers"
    assert auto_impl(  # the Python rule agrees with the C++ one
        case["qkv"], shape["dk"], dv, None) == "fused"
    run_and_compare(case, dtype)
    qkv = case["qkv"].detach().clone().requires_grad_()
    table = case["table"].clone().requires_grad_() if case["table"] is not None else None
    kw = dict(layout=case["layout"], bias_table=table, bias_index=case["index"], mask=case["mask"])
    out = window_attention(qkv, case["heads"], case["dk"], case["dv"], **kw)
    g = torch.randn_like(out)
    inputs = [qkv] + ([table] if table is not None else [])
    first = torch.autograd.grad(out, inputs, g, retain_graph=True)
    second = torch.autograd.grad(out, inputs, g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    monkeypatch.setenv("VITFAST_WINDOW_ATTENTION_ROUTE", "tiles")
    assert _ext.window_attention_route(torch.device("cuda"), dtype, n, shape["heads"], shape["dk"], dv) == "tiles"
    run_and_compare(case, dtype, impl="fused")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_auto_runs_sdpa_beyond_the_register_kernels(monkeypatch):
    """16-bit windows of more than 64 tokens take the SDPA route by default on CUDA, the fused tile
    kernels with impl="fused"; both match float64."""
    wa_mod = importlib.import_module("vitfast.ops.window_attention")  # the module (the package exports the op)
    calls = []
    real = wa_mod.head_mix_attention_sdpa
    monkeypatch.setattr(wa_mod, "head_mix_attention_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = make_case("cuda", torch.bfloat16, windows=2, heads=4, dk=32, wh=14, ww=14, layout="tinyvit")
    run_and_compare(case, torch.bfloat16)
    assert calls
    calls.clear()
    run_and_compare(case, torch.bfloat16, impl="fused")
    assert not calls


def test_route_query_off_cuda():
    from vitfast import _ext

    assert _ext.window_attention_route(torch.device("cpu"), torch.bfloat16, 49, 3, 32, 32) == "cpu"
