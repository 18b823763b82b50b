"""The ops' edges, on every path (native, fallback, meta): aliased state refused, meta tensors get
shapes and checks, empty batches give empty results, 0-d inputs and named layouts that would
leave channels unused are refused by name. (The randomised parity of the two paths is
tests/test_check_parity.py.)"""
from __future__ import annotations

import pytest
import torch

import vitfast
from vitfast.ops.covariance import covariance_update_

from conftest import DEVICES
from op_paths import run_path


def test_covariance_refuses_aliased_state():
    m2 = torch.zeros(4, 4, dtype=torch.float64)
    for native in (True, False):
        r = run_path(lambda: covariance_update_(torch.zeros((), dtype=torch.float64), m2[1], m2, torch.randn(3, 4)),
                     native)
        assert r[:3] == ("err", ValueError, "m2") and "share memory with 'mean'" in r[3]


def test_meta_tensors_get_shapes_and_checks():
    meta = torch.device("meta")
    out = vitfast.window_attention(torch.empty(2, 4, 24, device=meta), 1, 8)
    assert out.shape == (2, 4, 8) and out.device.type == "meta"
    out = vitfast.head_mix_attention(torch.empty(2, 4, 48, device=meta), 2, 8, pre_mix=torch.empty(2, 2, device=meta))
    assert out.shape == (2, 4, 16)
    v, i = vitfast.topk_softmax(torch.empty(3, 40, device=meta), 5)
    assert v.shape == i.shape == (3, 5)
    loss = vitfast.sparse_soft_target_cross_entropy(torch.empty(3, 40, device=meta), v.float(), i, reduction="none")
    assert loss.shape == (3,)
    s = torch.empty(3, 40, device=meta, dtype=torch.bfloat16, requires_grad=True)
    loss = vitfast.dense_soft_target_cross_entropy(s, torch.empty(3, 40, device=meta), reduction="none")
    assert loss.shape == (3,) and loss.dtype == torch.float32
    assert torch.autograd.grad(loss.sum(), s)[0].shape == (3, 40)
    covariance_update_(torch.zeros((), dtype=torch.float64, device=meta), torch.empty(5, dtype=torch.float64, device=meta),
                       torch.empty(5, 5, dtype=torch.float64, device=meta), torch.empty(7, 5, device=meta))
    with pytest.raises(ValueError, match="argument 'num_heads'"):
        vitfast.window_attention(torch.empty(2, 4, 24, device=meta), 0, 8)
    with pytest.raises(ValueError, match="argument 'pre_mix'"):
        vitfast.head_mix_attention(torch.empty(2, 4, 48, device=meta), 2, 8, pre_mix=torch.empty(3, 3, device=meta))
    with pytest.raises(ValueError, match="argument 'k'"):
        vitfast.topk_softmax(torch.empty(3, 40, device=meta), 41)
    with pytest.raises(ValueError, match="argument 'teacher_logits'"):
        vitfast.dense_soft_target_cross_entropy(torch.empty(3, 40, device=meta), torch.empty(3, 41, device=meta))
    with pytest.raises(ValueError, match="argument 'm2'"):
        covariance_update_(torch.zeros((), dtype=torch.float64, device=meta),
                           torch.empty(5, dtype=torch.float64, device=meta),
                           torch.empty(5, 4, dtype=torch.float64, device=meta), torch.empty(7, 5, device=meta))


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dev", DEVICES)
def test_empty_batches_give_empty_results(native, dev):
    """Zero rows / windows / images: an empty result (and empty or zero gradients) on every op."""
    torch.set_default_device(dev)
    try:
        assert run_path(lambda: _empty_batch_ops(), native) == ("ok", True)
    finally:
        torch.set_default_device(None)


def _empty_batch_ops():
    if True:
        qkv = torch.randn(0, 4, 24, dtype=torch.float64, requires_grad=True)
        table = torch.randn(1, 9, dtype=torch.float64, requires_grad=True)
        out = vitfast.window_attention(qkv, 1, 8, bias_table=table, bias_index=torch.zeros(4, 4, dtype=torch.long))
        assert out.shape == (0, 4, 8)
        gq, gt = torch.autograd.grad(out.sum(), (qkv, table), allow_unused=True)
        assert gq.shape == qkv.shape and (gt is None or not gt.any())
        grid = torch.randn(0, 4, 4, 48, dtype=torch.float64, requires_grad=True)
        mix = torch.eye(2, dtype=torch.float64, requires_grad=True)
        out = vitfast.head_mix_attention(grid, 2, 8, window_size=(2, 2), shift_size=(1, 1), post_mix=mix)
        assert out.shape == (0, 4, 4, 16)
        gm = torch.autograd.grad(out.sum(), mix, allow_unused=True)[0]
        assert gm is None or not gm.any()
        v, i = vitfast.topk_softmax(torch.randn(0, 10), 3)
        assert v.shape == i.shape == (0, 3)
        x = torch.randn(0, 10, requires_grad=True)
        loss = vitfast.sparse_soft_target_cross_entropy(x, v, i, reduction="sum")
        loss.backward()
        assert loss.item() == 0 and x.grad.shape == (0, 10)
        x = torch.randn(0, 10, requires_grad=True)
        loss = vitfast.dense_soft_target_cross_entropy(x, torch.randn(0, 10), reduction="mean")
        loss.backward()  # mean of nothing: NaN, as torch's own losses give
        assert loss.shape == () and x.grad.shape == (0, 10)
        state = (torch.tensor(2.0, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                 torch.eye(3, dtype=torch.float64))
        covariance_update_(*state, torch.randn(0, 3))
        assert state[0].item() == 2 and torch.equal(state[1], torch.ones(3, dtype=torch.float64))
        return True


@pytest.mark.parametrize("call", [
    lambda: vitfast.topk_softmax(torch.tensor(1.0), 1),
    lambda: vitfast.sparse_soft_target_cross_entropy(torch.tensor(1.0), torch.rand(1, 1), torch.zeros(1, 1,
                                                                                                        dtype=torch.long)),
    lambda: vitfast.dense_soft_target_cross_entropy(torch.tensor(1.0), torch.tensor(1.0)),
    lambda: vitfast.window_attention(torch.tensor(1.0), 1, 8),
    lambda: vitfast.head_mix_attention(torch.tensor(1.0), 1, 8),
    lambda: covariance_update_(torch.zeros((), dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                               torch.zeros(1, 1, dtype=torch.float64), torch.tensor(1.0)),
])
def test_zero_dim_inputs_are_named(call):
    for native in (True, False):
        r = run_path(call, native)
        assert r[0] == "err" and r[1] is ValueError, r


def test_named_layout_with_unused_channels_is_refused():
    """48 channels read as one 8-dim head would silently ignore half the input."""
    for native in (True, False):
        r = run_path(lambda: vitfast.window_attention(torch.randn(2, 4, 48), 1, 8), native)
        assert r[:3] == ("err", ValueError, "num_heads") and "48 channels" in r[3]
    # an explicit layout may leave channels out on purpose
    out = vitfast.window_attention(torch.randn(2, 4, 48), 1, 8, layout=(0, 8, 16, 48))
    assert out.shape == (2, 4, 8)


def test_cpu_attention_underflow_is_exactly_zero():
    """In the CPU attention kernels a probability below FLT_MIN is 0, not ~1e-38, which made the
    products it enters subnormal (x86's slow path: Swin's -100 shift mask doubled the CPU
    window-attention backward). Seen through the gradient of a table entry that only masked pairs
    use: the gradients of masked scores, P (dP - D), are then exactly 0."""
    n = 5
    eye = torch.eye(n, dtype=torch.long)
    index = eye + 2 * eye.roll(1, 1)  # table entries: 1 the query itself, 2 its neighbour, 0 the rest
    mask = torch.where(index > 0, 0.0, -100.0).unsqueeze(0)  # two keys a query
    for op in ("window", "head_mix"):
        qkv = torch.randn(3, n, 3 * 2 * 8, requires_grad=True)
        table = torch.randn(2, 3, requires_grad=True)
        if op == "window":
            out = vitfast.window_attention(qkv, 2, 8, bias_table=table, bias_index=index, mask=mask)
        else:
            out = vitfast.head_mix_attention(qkv, 2, 8, bias_table=table, bias_index=index, mask=mask,
                                             post_mix=torch.tensor([[1.0, 0.5], [0.2, 1.0]]), impl="fused")
        out.backward(torch.randn_like(out))
        assert torch.all(table.grad[:, 0] == 0), (op, table.grad)
        assert torch.all(table.grad[:, 1:] != 0), (op, table.grad)  # the kept pairs still have gradients


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("qkv_dtype", [torch.float32, torch.float64])
def test_mask_in_any_float_dtype(dev, qkv_dtype):
    """The attention ops take the shift mask in any float dtype: with values every dtype holds
    exactly, a float16 / bfloat16 / float64 mask gives the float32 mask's results bit for bit
    (the CPU kernels read a float32 or float64 mask in place and convert the others once per type;
    the windows outnumber the types, so converted types are reused)."""
    heads, dk, n, types = 2, 8, 9, 3
    qkv = torch.randn(4 * types, n, 3 * heads * dk, device=dev, dtype=qkv_dtype)
    table, index = torch.randn(heads, 5, device=dev, dtype=qkv_dtype), torch.randint(0, 5, (n, n), device=dev)
    # multiples of 1/8 below 16 in size: exact in every float dtype (bfloat16-rounded normals were
    # not: one below float16's normal range loses bits there)
    mask = (torch.randn(types, n, n, device=dev) * 8).round().clamp(-127, 127) / 8
    mask = torch.where(torch.rand(types, n, n, device=dev) < 0.3, -100.0, mask)
    mix = torch.tensor([[1.0, 0.3], [-0.2, 0.9]], device=dev, dtype=qkv_dtype)

    def run(op, m):
        x, t = qkv.clone().requires_grad_(), table.clone().requires_grad_()
        if op == "window":
            out = vitfast.window_attention(x, heads, dk, bias_table=t, bias_index=index, mask=m)
        else:
            out = vitfast.head_mix_attention(x, heads, dk, bias_table=t, bias_index=index, mask=m, pre_mix=mix,
                                             post_mix=mix, impl="fused")
        out.backward(torch.linspace(-1, 1, out.numel(), device=dev, dtype=qkv_dtype).view_as(out))
        return out.detach(), x.grad, t.grad

    for op in ("window", "head_mix"):
        want = run(op, mask)
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            got = run(op, mask.to(dtype))
            for name, a, b in zip(("out", "grad qkv", "grad table"), got, want):
                assert torch.equal(a, b), (op, dtype, name, (a - b).abs().max().item())
