"""Both paths, one set of rules: every op's arguments, drawn at random (hypothesis) or listed, are
either computed by the native kernel and by the fallback path (the pure-PyTorch reference, as
without the extension) to the same result, or refused by both with the same exception type naming
the same argument. Never a crash, a hang or a silent result on one path only. (Listed edges --
meta tensors, empty batches, aliasing -- are tests/test_op_edges.py.)"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis", reason="the property tests need hypothesis (requirements.txt)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import vitfast
from vitfast import _ext
from vitfast.ops.covariance import covariance_update_

from conftest import DEVICES
from op_paths import run_path

pytestmark = pytest.mark.skipif(not _ext.extension_loaded(), reason="needs the native extension to compare with")

FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def both_paths(fn, compare):
    native, fallback = run_path(fn, True), run_path(fn, False)
    assert native[0] == fallback[0], f"native {native[:1] + native[1:][-1:]} vs fallback {fallback}"
    if native[0] == "err":
        assert native[1:3] == fallback[1:3], f"native: {native[3]}\nfallback: {fallback[3]}"
    else:
        compare(native[1], fallback[1])
    return native


def close(a, b, dtype):
    a, b = (a if isinstance(a, (tuple, list)) else [a]), (b if isinstance(b, (tuple, list)) else [b])
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
            continue
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(x.double(), y.double(), equal_nan=True, **tol)


# --- window_attention / head_mix_attention -----------------------------------------------------------


ATTN_FAULTS = ["heads_nonpositive", "heads_over_mix_cap", "dim_k", "channels", "overlap", "int_qkv", "grid_divides",
               "shift", "table_heads", "index_range", "index_negative", "index_shape", "index_dtype", "table_alone",
               "index_alone", "mask_types", "mask_dtype", "mix_shape"]


# CUDA kernels trap on an out-of-range bias_index instead of syncing to check it (a device-side
# assert, tested in its own process): those faults are drawn on the CPU only
CUDA_TRAPS = ("index_range", "index_negative")


@st.composite
def attention_calls(draw, mix: bool, fault: str | None = None, device: str = "cpu"):
    """A valid call (about half the draws) or one with a single fault of a named kind."""
    faults = [f for f in ATTN_FAULTS if device == "cpu" or f not in CUDA_TRAPS]
    fault = fault or draw(st.sampled_from(["none"] * len(faults) + faults))
    heads = draw(st.sampled_from([1, 2, 3]))
    if fault == "heads_nonpositive":
        heads = draw(st.sampled_from([0, -1]))
    elif fault == "heads_over_mix_cap":
        heads = 33
    dk = draw(st.sampled_from([1, 4, 8])) if fault != "dim_k" else draw(st.sampled_from([0, 257]))
    dv = draw(st.sampled_from([None, 4, 8]))
    layout = draw(st.sampled_from(["swin", "tinyvit", "explicit"]))
    dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32]))
    dtype = torch.int32 if fault == "int_qkv" else dtype
    dv_eff = dk if dv is None else dv
    h = max(heads, 1)
    if layout == "swin":
        dv, dv_eff = None, dk  # 'swin' packs equal q/k/v head dims
        channels, lay = h * 3 * dk, "swin"
    elif layout == "tinyvit":
        channels, lay = h * (2 * dk + dv_eff), "tinyvit"
    else:  # a gap after each head: channels left unused on purpose
        stride = 2 * dk + dv_eff + 2
        channels, lay = h * stride, (0, dk, 2 * dk, stride)
    if fault == "overlap":
        channels, lay = h * 3 * dk, (0, max(dk - 1, 0), 2 * dk, 3 * dk)
    if fault == "channels":
        channels += draw(st.sampled_from([1, -1]))
    grid = draw(st.booleans())
    if grid:
        batch = draw(st.sampled_from([0, 1, 2]))
        wh, ww = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3]))
        hh, wd = wh * draw(st.sampled_from([1, 2])), ww * draw(st.sampled_from([1, 2]))
        hh += 1 if fault == "grid_divides" and wh > 1 else 0
        shift = (draw(st.integers(0, hh - 1)), draw(st.integers(0, wd - 1)))
        shift = (hh + 1, 0) if fault == "shift" else shift
        lead, tokens, per_image = (batch, hh, wd), wh * ww, (hh // wh) * (wd // ww)
        window_size = (wh, ww)
    else:
        windows, tokens = draw(st.sampled_from([0, 1, 2, 4])), draw(st.sampled_from([1, 3, 5]))
        lead, per_image, window_size, shift = (windows, tokens), None, None, (0, 0)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(*lead, max(channels, 0), generator=g, dtype=torch.float64) * 2
    qkv = qkv.to(dtype) if dtype != torch.int32 else qkv.round().to(torch.int32)
    kw = dict(layout=lay, window_size=window_size, shift_size=shift)
    if draw(st.booleans()) or fault.startswith(("table", "index")):
        length = draw(st.sampled_from([1, 9]))
        kw["bias_table"] = torch.randn(h + (fault == "table_heads"), length, generator=g, dtype=torch.float64)
        n = tokens + (fault == "index_shape")
        index = torch.randint(0, length, (n, n), generator=g)
        if fault == "index_range":
            index[-1, -1] = length
        if fault == "index_negative":
            index[0, 0] = -1
        kw["bias_index"] = index.float() if fault == "index_dtype" else index.to(
            draw(st.sampled_from([torch.int64, torch.int32])))
        if fault == "table_alone":
            del kw["bias_index"]
        if fault == "index_alone":
            del kw["bias_table"]
    if draw(st.booleans()) or fault.startswith("mask"):
        if per_image is None:  # window types must divide the windows
            types = draw(st.sampled_from([t for t in (1, 2, 4) if lead[0] % t == 0]))
        else:
            types = per_image
        types = types + 1 if fault == "mask_types" and not (per_image is None and lead[0] == 0) else types
        mask = torch.where(torch.rand(types, tokens, tokens, generator=g) < 0.3, -5.0, 0.0).double()
        mask.diagonal(dim1=1, dim2=2).zero_()  # no fully masked rows (their NaN is tested elsewhere)
        kw["mask"] = mask.long() if fault == "mask_dtype" else mask
    if mix:
        for name, shape in (("pre_mix", (h, h)), ("post_mix", (h, h)), ("pre_mix_bias", (h,)), ("post_mix_bias", (h,))):
            if draw(st.booleans()):
                kw[name] = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5 + (
                    torch.eye(h, dtype=torch.float64) if len(shape) == 2 else 0)
        if fault == "mix_shape":
            kw["post_mix"] = torch.randn(h + 1, h + 1, generator=g, dtype=torch.float64)
    return (qkv.to(device), heads, dk, dv,
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()})


def attention_forward_backward(op, qkv, heads, dk, dv, kw):
    """Output and, for float64 inputs, the gradients of every differentiable input."""
    def run():
        leaves = {}
        q = qkv.clone()
        if q.dtype == torch.float64 and q.numel():
            q.requires_grad_()
            leaves["qkv"] = q
        args = dict(kw)
        for name in ("bias_table", "pre_mix", "post_mix", "post_mix_bias"):
            if name in args and args[name].dtype == torch.float64 and "qkv" in leaves:
                args[name] = args[name].clone().requires_grad_()
                leaves[name] = args[name]
        out = op(q, heads, dk, dv, **args)
        if not leaves:
            return [out]
        grads = torch.autograd.grad((out * out).sum(), list(leaves.values()))
        return [out.detach(), *grads]
    return run


@pytest.mark.parametrize("op,mix", [(vitfast.window_attention, False), (vitfast.head_mix_attention, True)],
                         ids=["window_attention", "head_mix_attention"])
@pytest.mark.parametrize("dev", DEVICES)
def test_attention_paths_agree(op, mix, dev):
    """CPU: the native kernel vs the fallback; CUDA: the CUDA kernel vs the fallback on the GPU."""
    @FUZZ
    @given(call=attention_calls(mix=mix, device=dev))
    def check(call):
        qkv, heads, dk, dv, kw = call
        both_paths(attention_forward_backward(op, qkv, heads, dk, dv, kw), lambda a, b: close(a, b, qkv.dtype))

    check()


@pytest.mark.parametrize("fault", ATTN_FAULTS)
def test_every_fault_kind_is_refused_alike(fault):
    """Each kind of bad argument the strategy draws is met, and refused by both paths alike (a
    draw where the fault cannot apply, e.g. a shift on a 1-token window grid, may compute)."""
    outcomes = []

    @settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(call=attention_calls(mix=True, fault=fault))
    def check(call):
        qkv, heads, dk, dv, kw = call
        outcomes.append(both_paths(attention_forward_backward(vitfast.head_mix_attention, qkv, heads, dk, dv, kw),
                                   lambda a, b: close(a, b, qkv.dtype))[0])

    check()
    assert "err" in outcomes, outcomes


# --- topk_softmax / sparse and dense soft-target cross-entropy / covariance_update_ ------------------


@FUZZ
@given(rows=st.sampled_from([0, 1, 5]), classes=st.sampled_from([0, 1, 7, 40]), k=st.sampled_from([-1, 0, 1, 5, 41]),
       temperature=st.sampled_from([1.0, 0.5, 0.0, -1.0, 1e-39, float("inf"), float("nan")]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64]),
       values_dtype=st.sampled_from([None, torch.float32, torch.bfloat16]), dims=st.sampled_from([0, 1, 2, 3]),
       seed=st.integers(0, 2**31 - 1))
def test_topk_softmax_paths_agree(rows, classes, k, temperature, dtype, values_dtype, dims, seed):
    g = torch.Generator().manual_seed(seed)
    shape = {0: (), 1: (classes,), 2: (rows, classes), 3: (2, rows, classes)}[dims]
    x = torch.randn(shape, generator=g).to(dtype)

    def compare(a, b):
        assert torch.equal(a[1].long(), b[1].long())
        torch.testing.assert_close(a[0].float(), b[0].float(), rtol=2e-3, atol=1e-3, equal_nan=True)

    both_paths(lambda: vitfast.topk_softmax(x, k, temperature, values_dtype), compare)


@FUZZ
@given(rows=st.sampled_from([0, 1, 4]), classes=st.sampled_from([1, 6, 30]), k=st.sampled_from([0, 1, 3, 31]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.int32]),
       index_dtype=st.sampled_from([torch.int64, torch.int16, torch.float32]),
       corrupt=st.sampled_from(["none", "none", "range", "negative", "duplicate", "shape", "num_classes", "dims"]),
       seed=st.integers(0, 2**31 - 1))
def test_soft_target_paths_agree(rows, classes, k, dtype, index_dtype, corrupt, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    kk = max(min(k, classes), 1) if k else 0
    indices = torch.stack([torch.randperm(classes, generator=g)[:kk] for _ in range(rows)]) if rows else \
        torch.zeros(0, kk, dtype=torch.long)
    values = torch.rand(rows, kk, generator=g, dtype=torch.float64) / max(kk, 1)
    num_classes = classes
    if corrupt == "range" and rows and kk:
        indices[0, 0] = classes
    elif corrupt == "negative" and rows and kk:
        indices[-1, 0] = -1
    elif corrupt == "duplicate" and rows and kk > 1:
        indices[0, 1] = indices[0, 0]
    elif corrupt == "shape":
        values = values[:, :-1] if kk else values
    elif corrupt == "num_classes":
        num_classes = classes + 1
    elif corrupt == "dims":
        logits = logits[0] if rows else logits.reshape(-1)
    indices = indices.to(index_dtype)

    def run():
        x = logits.clone().requires_grad_(logits.dtype == torch.float64)
        loss = vitfast.sparse_soft_target_cross_entropy(x, values, indices, num_classes, reduction="sum")
        return [loss.detach()] + ([torch.autograd.grad(loss, x)[0]] if x.requires_grad else [])

    both_paths(run, lambda a, b: close(a, b, logits.dtype))


@FUZZ
@given(rows=st.sampled_from([0, 1, 4]), classes=st.sampled_from([0, 1, 6, 30]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.int32]),
       teacher_dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.int64]),
       scales=st.sampled_from([(1.0, 1.0), (0.25, 2.0), (0.0, 1.0), (1.0, -1.0), (float("nan"), 1.0),
                               (1.0, float("inf"))]),
       corrupt=st.sampled_from(["none", "none", "none", "shape", "dims", "neg_inf"]),
       seed=st.integers(0, 2**31 - 1))
def test_dense_soft_target_paths_agree(rows, classes, dtype, teacher_dtype, scales, corrupt, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 3).to(teacher_dtype)
    if corrupt == "shape":
        t = t[:, :-1] if classes else t.reshape(rows, 1, 0)
    elif corrupt == "dims":
        s, t = s.reshape(-1), t.reshape(-1)
    elif corrupt == "neg_inf" and t.is_floating_point() and rows and classes > 1:
        t[0, 0] = float("-inf")

    def run():
        x = s.clone().requires_grad_(s.dtype == torch.float64)
        loss = vitfast.dense_soft_target_cross_entropy(x, t, *scales, reduction="sum")
        return [loss.detach()] + ([torch.autograd.grad(loss, x)[0]] if x.requires_grad else [])

    both_paths(run, lambda a, b: close(a, b, s.dtype if s.dtype == torch.float64 or teacher_dtype != torch.float64
                                       else torch.float64))


@FUZZ
@given(rows=st.sampled_from([0, 1, 6]), features=st.sampled_from([0, 1, 5]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.int64]),
       state=st.sampled_from(["ok", "ok", "ok", "count_f32", "count_1d", "mean_f32", "mean_short", "m2_strided",
                              "mean_in_m2", "y_is_m2", "count_in_mean", "y_strided"]),
       seed=st.integers(0, 2**31 - 1))
def test_covariance_paths_agree(rows, features, dtype, state, seed):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(rows, features, generator=g, dtype=torch.float64) + 3).to(dtype)
    m = max(features, 1)
    count, mean, m2 = (torch.tensor(4.0, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64),
                       torch.eye(m, dtype=torch.float64) * 4)
    def make():
        """Fresh state (and y) for each path: the op updates them in place."""
        c, mu, s2, yy = count.clone(), mean.clone(), m2.clone(), y
        if state == "count_f32":
            c = c.float()
        elif state == "count_1d":
            c = c.reshape(1)
        elif state == "mean_f32":
            mu = mu.float()
        elif state == "mean_short":
            mu = mu[:-1]
        elif state == "m2_strided":
            s2 = torch.eye(2 * m, dtype=torch.float64)[::2, ::2]
        elif state == "mean_in_m2":
            mu = s2[0]
        elif state == "y_is_m2" and dtype == torch.float64:
            yy = s2
        elif state == "count_in_mean":
            c = mu[0]
        elif state == "y_strided":
            yy = y_wide[:, ::2]
        return c, mu, s2, yy

    y_wide = torch.randn(rows, 2 * features, generator=g, dtype=torch.float64).to(dtype)

    def run():
        c, mu, s2, yy = make()
        covariance_update_(c, mu, s2, yy)
        from vitfast.ops.covariance import symmetric_m2
        return [c.clone(), mu.clone(), symmetric_m2(s2).clone()]

    both_paths(run, lambda a, b: close(a, b, torch.float64) if dtype == torch.float64 else
               close(a, b, torch.float32))
