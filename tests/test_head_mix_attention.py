"""head_mix_attention (talking heads: MiniViT, CaiT) against the float64 reference: outputs and the
gradients of q/k/v, the bias table and all four mixing parameters, for every layout of
window_attention (sequences, windows, shifted feature maps, Swin / TinyViT packing), gradcheck,
registration, torch.compile, determinism and bad input."""
import importlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vitfast.ops import head_mix_attention, qkv_layout, window_attention
from vitfast.ops.reference import head_mix_attention_reference

from conftest import HAS_CUDA, rel_err
from test_window_attention import DTYPES, GRAD_TOL, OUT_TOL, make_case

MIX_NAMES = ("pre_mix", "pre_mix_bias", "post_mix", "post_mix_bias")


def param_dtype(dtype):
    """float32 parameters with 16-bit activations (autocast); float64 ones in float64 checks."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_mix(heads, device, which=MIX_NAMES, dtype=torch.float32):
    """Transforms near the identity (as after MiniViT's initialisation) plus noise."""
    mix = {}
    for name in which:
        if name.endswith("bias"):
            mix[name] = 0.1 * torch.randn(heads, device=device, dtype=dtype)
        else:
            mix[name] = torch.eye(heads, device=device, dtype=dtype) + 0.3 * torch.randn(heads, heads, device=device,
                                                                                         dtype=dtype)
    return mix


def run_and_compare(case, mix, dtype, impl="fused"):
    qkv = case["qkv"].detach().clone().requires_grad_()
    table = case["table"].clone().requires_grad_() if case["table"] is not None else None
    params = {k: v.clone().requires_grad_() for k, v in mix.items()}
    kw = dict(layout=case["layout"], bias_table=table, bias_index=case["index"], mask=case["mask"], **params)
    if case["window_size"]:
        kw.update(window_size=case["window_size"], shift_size=case["shift"])
    out = head_mix_attention(qkv, case["heads"], case["dk"], case["dv"], impl=impl, **kw)
    assert out.dtype == dtype and out.shape == (*qkv.shape[:-1], case["heads"] * case["dv"])
    grad = torch.randn_like(out)
    inputs = [qkv] + ([table] if table is not None else []) + list(params.values())
    grads = torch.autograd.grad(out, inputs, grad)

    qkv64 = case["qkv"].detach().cpu().double().requires_grad_()
    table64 = case["table"].detach().cpu().double().requires_grad_() if table is not None else None
    params64 = {k: v.detach().cpu().double().requires_grad_() for k, v in mix.items()}
    offsets, head_stride = qkv_layout(case["layout"], case["heads"], case["dk"], case["dv"])

    def reference(qkv64, table64, **params64):
        return head_mix_attention_reference(
            qkv64, case["heads"], case["dk"], case["dv"], offsets, head_stride, case["dk"] ** -0.5, table64,
            None if case["index"] is None else case["index"].cpu(), None if case["mask"] is None else case["mask"].cpu(),
            window_size=case["window_size"] or (), shift_size=case["shift"] if case["window_size"] else (), **params64)

    with MixTerms(params64) as terms:
        ref = reference(qkv64, table64, **params64)
    ref_inputs = [qkv64] + ([table64] if table is not None else []) + list(params64.values())
    ref_grads = torch.autograd.grad(ref, ref_inputs + terms.outputs(), grad.cpu().double())
    term_scale = terms.scales(ref_grads[len(ref_inputs):])
    assert rel_err(out.cpu(), ref) < OUT_TOL[dtype]
    names = ["qkv"] + (["table"] if table is not None else []) + list(params)
    for name, g, rg, x in zip(names, grads, ref_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        if name == "pre_mix_bias":  # cancels in the softmax: exactly zero here, ~1e-17 in the reference
            assert torch.count_nonzero(g) == 0 and rg.abs().max() < 1e-9
        elif rg.abs().max() == 0:
            # one token per window: the bias and the pre-mix cannot matter (P = 1); what is left is
            # rounding (dS' = P (dP - D) with dP and D rounded apart, times scores of ~10), so it is
            # bounded relative to the gradients' own scale, as the other gradients are
            scale = max(r.abs().max().item() for r in ref_grads)
            assert g.abs().max() < GRAD_TOL[dtype] * max(scale, 1.0), (name, g.abs().max().item(), scale)
        elif name in term_scale:
            # a mixing parameter's gradient is a sum over every score, whose terms can cancel to far
            # below their size (a 16-bit eager computation then misses the sum by 10%): each entry's
            # error is bounded in units of rounding of the sum of its terms' magnitudes instead
            units = ((g.cpu().double() - rg).abs() / term_scale[name]).max().item() / (torch.finfo(dtype).eps / 2)
            assert units < COND_UNITS[dtype], (name, units)
        else:
            assert rel_err(g.cpu(), rg) < GRAD_TOL[dtype], (name, rel_err(g.cpu(), rg))


# Bound on a mixing parameter's error over its terms' size (MixTerms), in units of rounding of the
# dtype (finfo.eps / 2). Worst seen on the CPU over 290 seeds of every case here and in test_cpu_isa,
# both routes: 2.0 units in 16 bits, 20 in 32 and 64 bits (pre_mix, impl="sdpa"). The maths is pinned
# by the float64 cases (a gradient scaled by 1 + 1e-11 fails ~all of them); in bfloat16 the bound is 3% of the
# terms' size, which is what impl="sdpa" (like eager talking heads) can promise there.
COND_UNITS = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 64, torch.float64: 64}


class MixTerms(TorchFunctionMode):
    """Records, inside the float64 reference, the tensors each mixing parameter meets: the scores S
    that the pre-softmax mix combines, the probabilities P that the post-softmax one combines, and
    the softmax's and P' V's operands. `scales` turns their gradients into the size of the terms that
    each parameter entry's gradient sums (pre_mix[g, h]: dS'_g S_h, post_mix[g, h]: dP'_g P_h,
    post_mix_bias[g]: dP'_g), each term's size taken before the cancellations that rounding misses."""

    def __init__(self, params):
        super().__init__()
        self.ids = {id(params[k]): k for k in ("pre_mix", "post_mix") if k in params}
        self.has_bias = "post_mix_bias" in params
        self.found = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.einsum and len(args) == 3 and id(args[1]) in self.ids:  # ("gh,whij->wgij", mix, x)
            self.found[self.ids[id(args[1])]] = (args[2], out)
        elif func is torch.Tensor.softmax:
            self.found["softmax"] = (args[0], out)
        elif func in (torch.Tensor.matmul, torch.matmul):  # q @ k^T, then p @ v: the last one stays
            self.found["p @ v"] = (args[1], out)
        return out

    def outputs(self):
        return [out for _, out in self.found.values()]

    def scales(self, grads):
        grad = {k: g for k, g in zip(self.found, grads)}
        scale = {}
        if "pre_mix" in self.found:
            # dS' = P (dP - D), D = rowsum(P dP): rounding follows P (|dP| + |D|), not the cancelled dS'
            p, dp = self.found["softmax"][1], grad["softmax"]
            ds = p * (dp.abs() + (p * dp).sum(-1, keepdim=True).abs())
            scale["pre_mix"] = torch.einsum("wgij,whij->gh", ds, self.found["pre_mix"][0].abs())
        # dP'_ij = dO_i . v_j: rounding follows |dO_i| . |v_j|
        dp_mix = grad["p @ v"].abs() @ self.found["p @ v"][0].abs().transpose(-1, -2)
        if "post_mix" in self.found:
            scale["post_mix"] = torch.einsum("wgij,whij->gh", dp_mix, self.found["post_mix"][0])
        if self.has_bias:
            scale["post_mix_bias"] = dp_mix.sum((0, 2, 3))
        return {k: v.clamp_min(1e-300) for k, v in scale.items()}


def fused_grads(case, mix):
    """Gradients of every leaf of one impl="fused" call (qkv, the table if any, then the mixing
    parameters) for a fixed output gradient: the reproducibility and route-agreement checks."""
    leaves = [case["qkv"].detach().clone().requires_grad_()] + \
        ([case["table"].clone().requires_grad_()] if case["table"] is not None else []) + \
        [v.clone().requires_grad_() for v in mix.values()]
    kw = dict(layout=case["layout"], bias_index=case["index"], mask=case["mask"],
              bias_table=leaves[1] if case["table"] is not None else None)
    if case["window_size"]:
        kw.update(window_size=case["window_size"], shift_size=case["shift"])
    out = head_mix_attention(leaves[0], case["heads"], case["dk"], case["dv"], impl="fused", **kw,
                             **dict(zip(mix, leaves[-len(mix):])))
    return torch.autograd.grad(out, leaves, torch.ones_like(out) / out.numel() ** 0.5)


SHAPES = [
    dict(windows=3, heads=3, dk=32, wh=7, ww=7, mask_types=3),               # Mini-Swin-T stage 1, shifted
    dict(windows=2, heads=6, dk=16, wh=1, ww=37, bias=False),                 # a DeiT-like sequence
    dict(windows=1, heads=4, dk=16, wh=10, ww=10),                            # several key tiles
    dict(windows=2, heads=5, dk=16, dv=32, wh=5, ww=6, layout="tinyvit"),     # dk != dv
    dict(windows=3, heads=2, dk=8, wh=1, ww=1),                               # one token
    dict(windows=1, heads=20, dk=16, wh=4, ww=4, bias=False),                 # > 16 heads (Swin-B stage 3: 16, 4: 32)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, dtype, shape):
    case = make_case(device, dtype, **shape)
    run_and_compare(case, make_mix(case["heads"], device, dtype=param_dtype(dtype)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid,window,shift", [((2, 14, 14), (7, 7), (3, 3)), ((1, 8, 12), (4, 6), (1, 5))])
def test_feature_map_matches_reference(device, dtype, grid, window, shift):
    case = make_case(device, dtype, grid=grid, wh=window[0], ww=window[1], shift=shift, heads=3, dk=16,
                     mask_types=(grid[1] // window[0]) * (grid[2] // window[1]))
    run_and_compare(case, make_mix(3, device, dtype=param_dtype(dtype)), dtype)


@pytest.mark.parametrize("which", [("pre_mix",), ("post_mix", "post_mix_bias"), ("pre_mix_bias",), ()])
def test_optional_transforms(device, which):
    """Any subset of the four parameters; none at all is plain window attention."""
    case = make_case(device, torch.float64, windows=2, heads=3, dk=8, wh=3, ww=3, mask_types=2)
    run_and_compare(case, make_mix(3, device, which, torch.float64), torch.float64)
    if not which:
        kw = dict(bias_table=case["table"], bias_index=case["index"], mask=case["mask"])
        torch.testing.assert_close(head_mix_attention(case["qkv"], 3, 8, **kw), window_attention(case["qkv"], 3, 8, **kw))


def test_identity_mix_is_window_attention(device):
    case = make_case(device, torch.float32, windows=4, heads=3, dk=16, wh=4, ww=4, mask_types=2)
    kw = dict(bias_table=case["table"], bias_index=case["index"], mask=case["mask"])
    eye = torch.eye(3, device=device)
    out = head_mix_attention(case["qkv"], 3, 16, pre_mix=eye, post_mix=eye, post_mix_bias=torch.zeros(3, device=device),
                             **kw)
    torch.testing.assert_close(out, window_attention(case["qkv"], 3, 16, **kw), rtol=1e-5, atol=1e-6)


def test_pre_mix_bias_has_no_effect(device):
    case = make_case(device, torch.float64, windows=2, heads=2, dk=8, wh=2, ww=3, bias=False)
    mix = make_mix(2, device, ("pre_mix", "post_mix"), torch.float64)
    a = head_mix_attention(case["qkv"], 2, 8, **mix)
    b = head_mix_attention(case["qkv"], 2, 8, pre_mix_bias=torch.full((2,), 7.0, device=device, dtype=torch.float64),
                           **mix)
    torch.testing.assert_close(a, b)


def test_gradcheck_cpu():
    case = make_case("cpu", torch.float64, windows=2, heads=3, dk=4, dv=3, wh=2, ww=3, layout="tinyvit",
                     mask_types=2)
    mix = make_mix(3, "cpu", dtype=torch.float64)
    leaves = [case["qkv"].detach().requires_grad_(), case["table"].detach().requires_grad_()] + \
             [mix[k].requires_grad_() for k in ("pre_mix", "post_mix", "post_mix_bias")]

    def fn(qkv, table, pre, post, post_bias):
        return head_mix_attention(qkv, 3, 4, 3, layout="tinyvit", bias_table=table, bias_index=case["index"],
                                  mask=case["mask"], pre_mix=pre, post_mix=post, post_mix_bias=post_bias)

    assert torch.autograd.gradcheck(fn, leaves)
    grid = make_case("cpu", torch.float64, grid=(1, 4, 6), heads=2, dk=3, wh=2, ww=3, shift=(1, 2), mask_types=4)
    gm = make_mix(2, "cpu", dtype=torch.float64)
    x, t = grid["qkv"].detach().requires_grad_(), grid["table"].detach().requires_grad_()
    w1, w2 = gm["pre_mix"].requires_grad_(), gm["post_mix"].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, t, w1, w2: head_mix_attention(x, 2, 3, bias_table=t, bias_index=grid["index"], mask=grid["mask"],
                                                window_size=(2, 3), shift_size=(1, 2), pre_mix=w1, post_mix=w2),
        (x, t, w1, w2))


# --- impl="sdpa": the mixes folded into scaled_dot_product_attention calls ---

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [
    dict(grid=(2, 8, 12), wh=4, ww=6, shift=(1, 5), heads=3, dk=16, mask_types=4),  # shifted feature map
    dict(windows=8, heads=2, dk=8, wh=3, ww=3, mask_types=4),  # two groups of four window types
])
def test_sdpa_route_matches_reference(device, dtype, shape):
    case = make_case(device, dtype, **shape)
    run_and_compare(case, make_mix(case["heads"], device, dtype=param_dtype(dtype)), dtype, impl="sdpa")


@pytest.mark.parametrize("which", [("pre_mix",), ("post_mix",), ("post_mix_bias",), ("pre_mix", "pre_mix_bias"), ()])
def test_sdpa_route_optional_transforms(device, which):
    case = make_case(device, torch.float64, windows=4, heads=3, dk=8, wh=3, ww=3, mask_types=2)
    run_and_compare(case, make_mix(3, device, which, torch.float64), torch.float64, impl="sdpa")


def test_sdpa_route_gradcheck_and_fused_agree():
    case = make_case("cpu", torch.float64, windows=4, heads=3, dk=4, dv=3, wh=2, ww=3, layout="tinyvit",
                     mask_types=2)
    mix = make_mix(3, "cpu", dtype=torch.float64)
    leaves = [case["qkv"].detach().requires_grad_(), case["table"].detach().requires_grad_()] + \
             [mix[k].requires_grad_() for k in ("pre_mix", "post_mix", "post_mix_bias")]

    def fn(impl):
        return lambda qkv, table, pre, post, post_bias: head_mix_attention(
            qkv, 3, 4, 3, layout="tinyvit", bias_table=table, bias_index=case["index"], mask=case["mask"],
            pre_mix=pre, post_mix=post, post_mix_bias=post_bias, impl=impl)

    assert torch.autograd.gradcheck(fn("sdpa"), leaves)
    torch.testing.assert_close(fn("sdpa")(*leaves), fn("fused")(*leaves), rtol=1e-12, atol=1e-12)


def test_sdpa_route_torch_compile_fullgraph(device):
    case = make_case(device, torch.float32, windows=4, heads=2, dk=16, wh=4, ww=4, mask_types=2)
    mix = make_mix(2, device)
    leaves = [case["qkv"].clone().requires_grad_(), case["table"].clone().requires_grad_(),
              mix["pre_mix"].clone().requires_grad_(), mix["post_mix"].clone().requires_grad_()]

    def step(qkv, table, pre, post):
        return head_mix_attention(qkv, 2, 16, bias_table=table, bias_index=case["index"], mask=case["mask"],
                                  pre_mix=pre, post_mix=post, impl="sdpa").square().mean()

    grads = torch.autograd.grad(torch.compile(step, fullgraph=True)(*leaves), leaves)
    ref = torch.autograd.grad(step(*leaves), leaves)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_unknown_impl_is_named():
    qkv = torch.randn(1, 4, 3 * 2 * 8)
    with pytest.raises(ValueError, match="argument 'impl' must be one of 'auto', 'fused', 'sdpa'"):
        head_mix_attention(qkv, 2, 8, impl="flash")


def test_auto_impl_rule(monkeypatch):
    """auto: the SDPA route for CUDA windows over 64 tokens (DeiT / CaiT sequences: the fused tile
    kernels measured slower than eager there) when gradients are wanted; without gradients the
    fused op where its forward is the streaming kernel (fp16/bf16, 3/4/6/8/12 heads of <= 64
    channels); the fused kernels elsewhere."""
    from vitfast import _ext
    from vitfast.ops.head_mix_attention import auto_impl

    asked = []  # the GPU's word (sm_80+, shared memory) is asked only for shapes the rule admits
    monkeypatch.setattr(_ext, "head_mix_stream_fits", lambda *a: asked.append(a) or True)

    class Fake:
        def __init__(self, device, shape, dtype=torch.bfloat16):
            self.device, self.shape, self.dtype = torch.device(device), shape, dtype

        def dim(self):
            return len(self.shape)

    assert auto_impl(Fake("cpu", (8, 197, 1152)), None, 6, 64, 64) == "fused"
    assert auto_impl(Fake("cuda", (8, 197, 1152)), None, 6, 64, 64) == "sdpa"
    assert auto_impl(Fake("cuda", (8, 197, 1152)), None) == "sdpa"  # gradients assumed wanted
    assert auto_impl(Fake("cuda", (8, 49, 288)), None, 3, 32, 32) == "fused"
    assert auto_impl(Fake("cuda", (2, 56, 56, 288)), [7, 7], 3, 32, 32) == "fused"
    assert auto_impl(Fake("cuda", (2, 24, 24, 288)), [12, 12], 3, 32, 32) == "sdpa"
    # inference: the streaming forward where it runs, SDPA where it does not
    assert auto_impl(Fake("cuda", (8, 197, 1152)), None, 6, 64, 64, needs_grad=False) == "fused"   # DeiT-S
    assert auto_impl(Fake("cuda", (8, 197, 2304)), None, 12, 64, 64, needs_grad=False) == "fused"  # DeiT-B
    assert auto_impl(Fake("cuda", (8, 197, 1152)), None, 8, 48, 48, needs_grad=False) == "fused"   # CaiT-S
    assert auto_impl(Fake("cuda", (8, 577, 2304)), None, 16, 48, 48, needs_grad=False) == "sdpa"   # CaiT-M
    assert auto_impl(Fake("cuda", (8, 197, 2304)), None, 6, 128, 128, needs_grad=False) == "sdpa"  # head dim 128
    assert auto_impl(Fake("cuda", (8, 197, 1152), torch.float32), None, 6, 64, 64, needs_grad=False) == "sdpa"
    assert len(asked) == 3  # DeiT-S, DeiT-B, CaiT-S
    # a GPU without the shared memory for the kernel (an A100 at 12 heads of 64): SDPA
    monkeypatch.setattr(_ext, "head_mix_stream_fits", lambda *a: False)
    assert auto_impl(Fake("cuda", (8, 197, 2304)), None, 12, 64, 64, needs_grad=False) == "sdpa"


def test_head_mix_stream_fits_off_cuda():
    from vitfast import _ext

    assert _ext.head_mix_stream_fits(torch.device("cpu"), torch.bfloat16, 6, 64, 64) is False


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_auto_takes_the_sdpa_route_for_sequences_on_cuda(monkeypatch):
    hm_mod = importlib.import_module("vitfast.ops.head_mix_attention")  # the module (the package exports the op)
    calls = []
    real = hm_mod.head_mix_attention_sdpa
    monkeypatch.setattr(hm_mod, "head_mix_attention_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    qkv = torch.randn(2, 80, 3 * 4 * 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head_mix_attention(qkv, 4, 16, pre_mix=torch.eye(4, device="cuda"))
    assert calls
    calls.clear()
    head_mix_attention(qkv, 4, 16, pre_mix=torch.eye(4, device="cuda"), impl="fused")
    assert not calls
    with torch.no_grad():  # inference: the streaming forward
        head_mix_attention(qkv, 4, 16, pre_mix=torch.eye(4, device="cuda"))
    assert not calls
    head_mix_attention(qkv.detach(), 4, 16, pre_mix=torch.eye(4, device="cuda"))  # nothing requires grad
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fits", [(False, False), (True, False)], ids=["forward_too", "backward_only"])
def test_shapes_the_kernels_cannot_hold_run_the_composite(monkeypatch, dtype, fits):
    """Where the fused kernels have no launch configuration (the H100 run found float32 with 20
    heads, and CaiT-M36's 16 heads of 48 in float32), the op still answers: the forward, or only the
    backward, runs the float32-or-wider composite, with one warning per shape."""
    from vitfast import _ext
    from vitfast.ops import _composite

    asked = []
    monkeypatch.setattr(_ext, "head_mix_fits", lambda *a: asked.append(a) or fits)
    monkeypatch.setattr(_composite, "_warned", set())
    case = make_case("cpu", dtype, windows=2, heads=3, dk=8, wh=3, ww=3, mask_types=2)
    with pytest.warns(RuntimeWarning, match="composite") as seen:
        run_and_compare(case, make_mix(3, "cpu", dtype=param_dtype(dtype)), dtype)
        run_and_compare(case, make_mix(3, "cpu", dtype=param_dtype(dtype)), dtype)
    # one warning per shape, not per call, naming what runs as the composite
    msgs = [str(w.message) for w in seen if "composite" in str(w.message)]
    assert len(msgs) == 1 and ("fused CUDA forward" if not fits[0] else "fused CUDA backward") in msgs[0]
    # its hint holds for the call: 16-bit inputs already are (24 / 32 heads of 32 in bf16), wider not
    assert ("16-bit inputs (autocast)" in msgs[0]) == (dtype == torch.float64)
    assert asked and asked[0][1:5] == (dtype, 3, 8, 8)


def test_fit_query_is_a_compile_time_constant_without_importing_dynamo():
    """vitfast marks head_mix_fits the way torch.compiler.assume_constant_result does (so traced
    graphs do not break on it), without that import's 1.7 s at `import vitfast`."""
    import subprocess
    import sys

    from vitfast import _ext

    def probe():
        return 1

    torch.compiler.assume_constant_result(probe)
    marks = {k for k in vars(probe)}
    assert marks and marks <= set(vars(_ext.head_mix_fits)) and marks <= set(vars(_ext.window_attention_fits)), marks
    code = "import sys, vitfast; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype,heads,dk", [(torch.float32, 20, 16), (torch.float32, 16, 48), (torch.float64, 32, 64),
                                            (torch.bfloat16, 16, 48)])
def test_kernel_fit_query_on_gpu(dtype, heads, dk, monkeypatch):
    """The planner's answer (vitfast._C.head_mix_fits) and the op agree: a shape that fits runs
    fused without a warning, one that does not runs the composite with one; both match float64."""
    import warnings as w
    from vitfast import _ext
    from vitfast.ops import _composite

    monkeypatch.setattr(_composite, "_warned", set())  # earlier tests may have warned for this shape

    fwd, bwd = _ext.head_mix_fits(torch.device("cuda"), dtype, heads, dk, dk, True, False)
    if dtype == torch.bfloat16:
        assert fwd and bwd  # CaiT-M36 under autocast: fused
    if (dtype, heads) == (torch.float32, 20):
        assert not bwd  # measured: no backward configuration on an H100 (227 KB per block)
    case = make_case("cuda", dtype, windows=2, heads=heads, dk=dk, wh=1, ww=20, bias=False)
    with w.catch_warnings(record=True) as seen:
        w.simplefilter("always")
        run_and_compare(case, make_mix(heads, "cuda", dtype=param_dtype(dtype)), dtype)
    assert any("composite" in str(x.message) for x in seen) == (not (fwd and bwd))


def _op_args(case, mix, heads, dk):
    offsets, hs = qkv_layout("swin", heads, dk, dk)
    window = list(case["window_size"]) if case["window_size"] else []
    shift = list(case["shift"]) if case["window_size"] else []
    return (case["qkv"], case["table"], case["index"], case["mask"], mix["pre_mix"], mix["pre_mix_bias"],
            mix["post_mix"], mix["post_mix_bias"], heads, dk, dk, offsets, hs, dk ** -0.5, window, shift)


def test_opcheck(device):
    for case in (make_case(device, torch.float32, windows=4, heads=2, dk=16, wh=3, ww=3, mask_types=2),
                 make_case(device, torch.float32, grid=(2, 6, 6), heads=2, dk=16, wh=3, ww=3, shift=(1, 1),
                           mask_types=4)):
        mix = {k: v.requires_grad_() for k, v in make_mix(2, device).items()}
        case["qkv"].requires_grad_()
        case["table"].requires_grad_()
        args = _op_args(case, mix, 2, 16)
        torch.library.opcheck(torch.ops.vitfast.head_mix_attention_forward.default, args)
        out, lse = torch.ops.vitfast.head_mix_attention_forward(*args)
        plain = tuple(a.detach() if torch.is_tensor(a) else a for a in args)  # the backward op has no autograd
        bargs = (torch.randn_like(out).detach(), plain[0], lse.detach()) + plain[1:] + (True, True)
        torch.library.opcheck(torch.ops.vitfast.head_mix_attention_backward.default, bargs)


def test_torch_compile_fullgraph(device):
    case = make_case(device, torch.float32, windows=4, heads=2, dk=16, wh=4, ww=4, mask_types=2)
    proj = torch.nn.Linear(32, 8).to(device)
    mix = make_mix(2, device)

    def step(qkv, table, pre, post, post_bias):
        out = head_mix_attention(qkv, 2, 16, bias_table=table, bias_index=case["index"], mask=case["mask"],
                                 pre_mix=pre, post_mix=post, post_mix_bias=post_bias)
        return proj(out).square().mean()

    def leaves():
        return [case["qkv"].clone().requires_grad_(), case["table"].clone().requires_grad_()] + \
               [mix[k].clone().requires_grad_() for k in ("pre_mix", "post_mix", "post_mix_bias")]

    a, b = leaves(), leaves()
    loss = torch.compile(step, fullgraph=True)(*a)
    loss.backward()
    ref = step(*b)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("mode", [False, True])
def test_gradients_bitwise_reproducible(device, mode):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    case = make_case(device, dtype, windows=48, heads=3, dk=32, mask_types=4)
    mix = make_mix(3, device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(mode)
    try:
        grads = []
        for _ in range(3):
            leaves = [case["qkv"].clone().requires_grad_(), case["table"].clone().requires_grad_()] + \
                     [v.clone().requires_grad_() for v in mix.values()]
            out = head_mix_attention(leaves[0], 3, 32, bias_table=leaves[1], bias_index=case["index"],
                                     mask=case["mask"], **dict(zip(mix, leaves[2:])))
            grads.append(torch.autograd.grad(out.float().square().sum(), leaves))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(x, y) for g in grads[1:] for x, y in zip(grads[0], g))


def test_fully_masked_row_is_nan_like_softmax(device):
    qkv = torch.randn(2, 4, 3 * 2 * 8, device=device)
    mask = torch.zeros(1, 4, 4, device=device)
    mask[0, 1] = float("-inf")
    mix = make_mix(2, device)
    out = head_mix_attention(qkv, 2, 8, mask=mask, **mix)
    ref = head_mix_attention_reference(qkv.double().cpu(), 2, 8, 8, [0, 16, 32], 8, 8 ** -0.5, mask=mask.double().cpu(),
                                       **{k: v.double().cpu() for k, v in mix.items()})
    assert torch.isnan(out[:, 1]).all() and torch.isnan(ref[:, 1]).all()
    torch.testing.assert_close(out[:, [0, 2, 3]].cpu().double(), ref[:, [0, 2, 3]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,exc,words", [
    (dict(pre_mix=torch.zeros(3, 3)), ValueError, "'pre_mix'"),
    (dict(post_mix=torch.zeros(2, 2, dtype=torch.int32)), TypeError, "'post_mix'"),
    (dict(post_mix_bias=torch.zeros(2, 1)), ValueError, "'post_mix_bias'"),
    (dict(pre_mix_bias=torch.zeros(3)), ValueError, "'pre_mix_bias'"),
    (dict(qkv=torch.zeros(2, 4, 33 * 3), num_heads=33, dim_k=1), ValueError, "'num_heads'"),
    (dict(num_heads=0), ValueError, "'num_heads'"),
    (dict(bias_table=torch.zeros(2, 9)), ValueError, "'bias_index'"),
    (dict(mask=torch.zeros(3, 4, 4)), ValueError, "'mask'"),
])
def test_bad_arguments_are_named(bad, exc, words, op_path):
    kw = dict(qkv=torch.zeros(2, 4, 48), num_heads=2, dim_k=8)
    kw.update(bad)
    qkv, heads, dk = kw.pop("qkv"), kw.pop("num_heads"), kw.pop("dim_k")
    with pytest.raises(exc, match=words):
        head_mix_attention(qkv, heads, dk, **kw)
    with pytest.raises(exc, match="vitfast.head_mix_attention"):
        head_mix_attention(qkv, heads, dk, **kw)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("shape", [
    dict(windows=4, heads=6, dk=64, wh=1, ww=197, bias=False),    # DeiT-S / Mini-DeiT-S
    dict(windows=2, heads=12, dk=64, wh=1, ww=197, bias=False),   # DeiT-B
    dict(windows=2, heads=8, dk=48, wh=1, ww=196, bias=False),    # CaiT-S
    dict(windows=1, heads=16, dk=48, wh=1, ww=577, bias=False),   # CaiT-M @384 (sized down)
    dict(windows=64, heads=3, dk=32, wh=7, ww=7, mask_types=64),  # Mini-Swin-T stage 1
    dict(windows=2, heads=32, dk=32, wh=7, ww=7, mask_types=1),   # Mini-Swin-B stage 4
])
def test_cuda_model_shapes(shape):
    case = make_case("cuda", torch.bfloat16, **shape)
    run_and_compare(case, make_mix(shape["heads"], "cuda"), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    dict(windows=320, heads=3, dk=32, wh=7, ww=7, mask_types=64),   # Mini-Swin-T stage 1: more windows than slots (132 SMs)
    dict(windows=8, heads=4, dk=32, wh=7, ww=7, mask_types=4),      # Mini-Swin-B stage 1
    dict(windows=6, heads=3, dk=32, wh=8, ww=8, mask_types=2),      # 64 tokens
    dict(windows=3, heads=4, dk=16, dv=32, wh=3, ww=6, layout="tinyvit", bias=False),
    dict(windows=3, heads=3, dk=24, wh=4, ww=5, row_pad=3),         # scalar loads (rows not 16-byte aligned)
])
def test_register_and_tile_kernels_both_match_reference(monkeypatch, dtype, shape):
    """fp16/bf16 windows of <= 64 tokens with 3 or 4 heads of <= 32 channels run the register kernels
    (head_mix_reg.cuh) by default; forced onto the tile kernels the same case must agree with
    float64 too; the register backward is bitwise reproducible (table and mixing gradients summed
    over slots in a fixed order)."""
    from vitfast import _ext

    case = make_case("cuda", dtype, **shape)
    n = shape["wh"] * shape["ww"]
    dv = shape.get("dv", shape["dk"])
    assert _ext.head_mix_attention_route(torch.device("cuda"), dtype, n, shape["heads"], shape["dk"], dv) == "registers"
    mix = make_mix(shape["heads"], "cuda")
    run_and_compare(case, mix, dtype)
    first, second = fused_grads(case, mix), fused_grads(case, mix)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    monkeypatch.setenv("VITFAST_WINDOW_ATTENTION_ROUTE", "tiles")
    assert _ext.head_mix_attention_route(torch.device("cuda"), dtype, n, shape["heads"], shape["dk"], dv) == "tiles"
    run_and_compare(case, mix, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype,tokens,heads,dk,table,route", [
    (torch.bfloat16, 49, 3, 32, True, "registers"),
    (torch.float16, 49, 4, 32, True, "registers"),
    (torch.bfloat16, 64, 4, 32, True, "stream"),  # the register backward needs 272 KB of shared memory
    (torch.bfloat16, 64, 4, 32, False, "stream"),
    (torch.bfloat16, 49, 6, 32, True, "stream"),         # Mini-Swin-T stage 2
    (torch.bfloat16, 49, 8, 32, True, "stream"),         # Mini-Swin-B stage 2
    (torch.bfloat16, 49, 12, 32, True, "stream"),        # Mini-Swin-T stage 3: 12 heads of 32
    (torch.float16, 49, 12, 24, False, "stream"),        # 12 heads of <= 32 channels
    (torch.bfloat16, 49, 3, 64, True, "stream"),
    (torch.bfloat16, 81, 3, 32, True, "stream"),
    (torch.float16, 197, 6, 64, False, "stream"),        # DeiT-S
    (torch.bfloat16, 197, 3, 64, False, "stream"),       # DeiT-Ti
    (torch.bfloat16, 197, 4, 48, False, "stream"),       # CaiT-XXS
    (torch.bfloat16, 197, 12, 64, False, "stream"),      # DeiT-B: 12 heads of 64, head-split backward
    (torch.float16, 577, 12, 64, False, "stream"),       # DeiT-B @384
    (torch.bfloat16, 197, 12, 48, False, "stream"),      # 12 heads past 32 channels
    (torch.bfloat16, 49, 12, 64, True, "stream"),        # 12 heads of 64 with a table
    (torch.bfloat16, 197, 8, 48, False, "stream"),       # CaiT-S
    (torch.bfloat16, 197, 8, 48, True, "stream"),
    (torch.bfloat16, 1024, 8, 32, True, "stream+tiles"),  # table-gradient sums past 128 MiB
    (torch.bfloat16, 577, 16, 48, False, "stream+tiles"),  # CaiT-M: head-split forward, tile backward
    (torch.bfloat16, 49, 16, 32, True, "stream"),        # Mini-Swin-B stage 3: head-split forward and backward
    (torch.float16, 49, 24, 32, True, "stream+tiles"),   # Mini-Swin-T stage 4: head-split forward
    (torch.bfloat16, 49, 24, 64, True, "tiles"),         # 24 heads of 64: no head-split forward
    (torch.bfloat16, 49, 32, 32, True, "tiles"),         # Mini-Swin-B stage 4
    (torch.bfloat16, 49, 5, 32, True, "tiles"),
    (torch.bfloat16, 197, 6, 80, False, "tiles"),
    (torch.float32, 49, 3, 32, True, "tiles"),
    (torch.float32, 197, 6, 64, False, "tiles"),
])
def test_register_route_rule(dtype, tokens, heads, dk, table, route):
    from vitfast import _ext

    assert _ext.head_mix_attention_route(torch.device("cuda"), dtype, tokens, heads, dk, dk, table=table) == route


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    dict(windows=32, heads=6, dk=64, wh=1, ww=197, bias=False),              # DeiT-S rows
    dict(windows=4, heads=12, dk=64, wh=1, ww=197, bias=False),              # DeiT-B
    dict(windows=2, heads=8, dk=48, wh=1, ww=577, bias=False),               # CaiT-S @384: 10 query chunks
    dict(windows=64, heads=12, dk=32, wh=7, ww=7, mask_types=16),            # Mini-Swin-T stage 3
    dict(grid=(2, 28, 28), heads=6, dk=32, wh=7, ww=7, shift=(3, 3), mask_types=16),  # stage 2, shifted map
    dict(windows=3, heads=4, dk=40, dv=24, wh=5, ww=15, layout="tinyvit", row_pad=3),  # scalar loads
    # the head-split forward (head_mix_split_fwd.cuh)
    dict(windows=64, heads=16, dk=32, wh=7, ww=7, mask_types=4),            # Mini-Swin-B stage 3
    dict(windows=32, heads=24, dk=32, wh=7, ww=7),                          # Mini-Swin-T stage 4 (table only)
    dict(windows=2, heads=16, dk=48, wh=1, ww=577, bias=False),             # CaiT-M @384
    dict(windows=3, heads=16, dk=40, dv=24, wh=5, ww=15, layout="tinyvit", row_pad=3),  # scalar loads
])
def test_streaming_forward_matches_reference_and_tiles(monkeypatch, dtype, shape):
    """Shapes the streaming forward takes (head_mix_stream.cuh; 16 and 24 heads: the head-split
    forward, head_mix_split_fwd.cuh): output and lse-dependent gradients (the tile backward reads
    the streaming forward's log-sum-exp; 24 heads' backward is the composite) against float64, the
    inference route (auto under no_grad) against the same, and the forced tile forward agrees."""
    from vitfast import _ext

    case = make_case("cuda", dtype, **shape)
    n = shape["wh"] * shape["ww"]
    dv = shape.get("dv", shape["dk"])
    wide = max(shape["dk"], dv) > 32
    want = "stream" if shape["heads"] <= 12 or (shape["heads"] == 16 and not wide) else "stream+tiles"
    assert _ext.head_mix_attention_route(torch.device("cuda"), dtype, n, shape["heads"], shape["dk"], dv,
                                         table=case["table"] is not None, mask=case["mask"] is not None) == want
    mix = make_mix(shape["heads"], "cuda")
    run_and_compare(case, mix, dtype)
    kw = dict(layout=case["layout"], bias_table=case["table"], bias_index=case["index"], mask=case["mask"], **mix)
    if case["window_size"]:
        kw.update(window_size=case["window_size"], shift_size=case["shift"])
    with torch.no_grad():
        inference = head_mix_attention(case["qkv"], case["heads"], case["dk"], case["dv"], **kw)
        fused = head_mix_attention(case["qkv"], case["heads"], case["dk"], case["dv"], impl="fused", **kw)
        monkeypatch.setenv("VITFAST_WINDOW_ATTENTION_ROUTE", "tiles")
        tiles = head_mix_attention(case["qkv"], case["heads"], case["dk"], case["dv"], impl="fused", **kw)
    assert torch.equal(inference, fused)  # auto without gradients is the fused op
    assert rel_err(fused.float(), tiles.float()) < OUT_TOL[dtype]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    dict(windows=32, heads=6, dk=64, wh=1, ww=197, bias=False),              # DeiT-S rows
    dict(windows=16, heads=3, dk=64, wh=1, ww=197, bias=False),              # DeiT-Ti
    dict(windows=8, heads=4, dk=48, wh=1, ww=197, bias=False),               # CaiT-XXS (head dim 48)
    dict(windows=8, heads=8, dk=48, wh=1, ww=197, bias=False),               # CaiT-S (221 KB of shared memory)
    dict(windows=4, heads=6, dk=64, wh=1, ww=577, bias=False),               # DeiT-S @384: 10 chunks
    dict(windows=300, heads=6, dk=32, wh=1, ww=70, bias=False),              # more items than resident blocks
    dict(windows=3, heads=4, dk=40, dv=24, wh=5, ww=15, layout="tinyvit", row_pad=3, bias=False),  # scalar loads
    dict(grid=(2, 28, 28), heads=6, dk=32, wh=7, ww=7, shift=(3, 3), mask_types=16),  # Mini-Swin-T stage 2, shifted
    dict(windows=256, heads=8, dk=32, wh=7, ww=7),                          # Mini-Swin-B stage 2, table only
    dict(windows=64, heads=3, dk=64, wh=8, ww=10, bias=False, mask_types=4),  # mask only
    dict(grid=(2, 14, 14), heads=12, dk=32, wh=7, ww=7, shift=(3, 3), mask_types=4),  # Mini-Swin-T stage 3, shifted
    dict(windows=512, heads=12, dk=32, wh=7, ww=7, mask_types=4),           # stage 3 at bs 128: items loop
    dict(windows=6, heads=12, dk=24, dv=16, wh=1, ww=70, layout="tinyvit", row_pad=3, bias=False),  # 12 heads, scalar
    # 12 heads of 48-64 channels: the head-split kernels (head_mix_split_bwd.cuh)
    dict(windows=8, heads=12, dk=64, wh=1, ww=197, bias=False),             # DeiT-B rows
    dict(windows=2, heads=12, dk=64, wh=1, ww=577, bias=False),             # DeiT-B @384: 37 query chunks
    dict(windows=300, heads=12, dk=64, wh=1, ww=40, bias=False),            # more items than resident blocks
    dict(grid=(2, 14, 14), heads=12, dk=48, wh=7, ww=7, shift=(3, 3), mask_types=4),  # table + mask, shifted
    dict(windows=4, heads=12, dk=40, dv=56, wh=1, ww=37, layout="tinyvit", row_pad=3, bias=False),  # scalar loads
    dict(grid=(2, 28, 28), heads=16, dk=32, wh=7, ww=7, shift=(3, 3), mask_types=16),  # 16 heads of 32, shifted
    dict(windows=300, heads=16, dk=24, dv=16, wh=1, ww=40, layout="tinyvit", row_pad=3, bias=False),  # 16, scalar
])
def test_streaming_backward_matches_reference_and_tiles(monkeypatch, dtype, shape):
    """Shapes the streaming backward takes (head_mix_stream_bwd.cuh: 3/4/6/8 heads, 12 of <= 32
    channels; head_mix_split_bwd.cuh: 12 of 48-64, 16 of <= 32; with or without a table and a mask): every gradient against float64, bitwise reproducible over two runs (the
    mixing and table gradients are summed per warp or thread, block and over blocks in fixed
    orders), and the tile backward behind the same forward (VITFAST_HEAD_MIX_STREAM_BWD=0) agrees."""
    from vitfast import _ext

    case = make_case("cuda", dtype, **shape)
    n = shape["wh"] * shape["ww"]
    dv = shape.get("dv", shape["dk"])
    flags = dict(table=case["table"] is not None, mask=case["mask"] is not None)
    assert _ext.head_mix_attention_route(torch.device("cuda"), dtype, n, shape["heads"], shape["dk"], dv,
                                         **flags) == "stream"
    mix = make_mix(shape["heads"], "cuda")
    run_and_compare(case, mix, dtype)

    first, second = fused_grads(case, mix), fused_grads(case, mix)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    monkeypatch.setenv("VITFAST_HEAD_MIX_STREAM_BWD", "0")
    assert _ext.head_mix_attention_route(torch.device("cuda"), dtype, n, shape["heads"], shape["dk"], dv,
                                         **flags) == "stream+tiles"
    tiles = fused_grads(case, mix)
    names = ["qkv"] + (["table"] if case["table"] is not None else []) + list(mix)
    for name, a, b in zip(names, first, tiles):
        if name != "pre_mix_bias":
            assert rel_err(a.float(), b.float()) < GRAD_TOL[dtype], name


def test_head_mix_route_query_off_cuda():
    from vitfast import _ext

    assert _ext.head_mix_attention_route(torch.device("cpu"), torch.bfloat16, 49, 3, 32, 32) == "cpu"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_register_backward_pipeline_changes_no_bit(monkeypatch):
    """The register backward's cp.async double buffering (3 heads, float32 mask) moves loads, not
    arithmetic: with VITFAST_HEAD_MIX_PIPELINE=0 every gradient is bitwise the same."""
    # 320 windows: 2-3 per backward slot on a 132-SM GPU, so the pipeline's steady state runs
    case = make_case("cuda", torch.bfloat16, windows=320, heads=3, dk=32, wh=7, ww=7, mask_types=64)
    mix = make_mix(3, "cuda")

    def grads():
        leaves = [case["qkv"].detach().clone().requires_grad_(), case["table"].clone().requires_grad_()] + \
            [v.clone().requires_grad_() for v in mix.values()]
        out = head_mix_attention(leaves[0], 3, 32, bias_table=leaves[1], bias_index=case["index"], mask=case["mask"],
                                 impl="fused", **dict(zip(mix, leaves[2:])))
        return torch.autograd.grad(out.float().square().sum(), leaves)

    piped = grads()
    monkeypatch.setenv("VITFAST_HEAD_MIX_PIPELINE", "0")
    plain = grads()
    assert all(torch.equal(a, b) for a, b in zip(piped, plain))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [
    dict(windows=8, heads=12, dk=64, wh=1, ww=197, bias=False),             # DeiT-B rows
    dict(windows=4, heads=12, dk=48, wh=7, ww=7, mask_types=2),             # table and mask
    dict(windows=3, heads=12, dk=40, dv=56, wh=1, ww=37, layout="tinyvit", row_pad=3, bias=False),  # scalar loads
])
def test_head_split_forward_on_request_matches_streaming_forward(monkeypatch, dtype, shape):
    """VITFAST_HEAD_MIX_SPLIT_FWD=1 runs DeiT-B's 12 heads of 48-64 on the head-split forward
    (head_mix_split_fwd.cuh) instead of the streaming forward, to time one against the other in one
    process: both match float64 (with the head-split backward behind them) and each other."""
    case = make_case("cuda", dtype, **shape)
    mix = make_mix(shape["heads"], "cuda")
    kw = dict(layout=case["layout"], bias_table=case["table"], bias_index=case["index"], mask=case["mask"], **mix)
    if case["window_size"]:
        kw.update(window_size=case["window_size"], shift_size=case["shift"])
    with torch.no_grad():
        streaming = head_mix_attention(case["qkv"], case["heads"], case["dk"], case["dv"], impl="fused", **kw)
        monkeypatch.setenv("VITFAST_HEAD_MIX_SPLIT_FWD", "1")
        split = head_mix_attention(case["qkv"], case["heads"], case["dk"], case["dv"], impl="fused", **kw)
    run_and_compare(case, mix, dtype)
    assert rel_err(split.float(), streaming.float()) < OUT_TOL[dtype]
