"""topk_softmax against its float64 reference, on every dtype and awkward size."""
import pytest
import torch

from vitfast import topk_softmax
from vitfast.ops.reference import topk_softmax_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (rows, classes, k): single class, odd sizes, k=1, k=C, ImageNet-21k, int32 indices, k at its cap
SHAPES = [(1, 1, 1), (3, 7, 1), (5, 7, 7), (17, 1000, 10), (4, 21841, 100), (2, 33000, 128), (3, 129, 129),
          (2, 5000, 2048), (1, 32768, 5), (1, 32769, 5)]
VALUE_TOL = {torch.float16: dict(rtol=1e-3, atol=1e-7), torch.float32: dict(rtol=2e-5, atol=1e-10)}


def check(logits, k, temperature=1.0, values_dtype=None):
    values, indices = topk_softmax(logits, k, temperature, values_dtype)
    ref_v, ref_i = topk_softmax_reference(logits.cpu(), k, temperature, values_dtype)
    assert values.dtype == (values_dtype or torch.float16)
    assert indices.dtype == (torch.int16 if logits.shape[-1] <= 32768 else torch.int32)
    assert values.shape == indices.shape == (*logits.shape[:-1], k)
    # The order is decided on the exact logits, so indices must match exactly.
    torch.testing.assert_close(indices.cpu(), ref_i, rtol=0, atol=0)
    torch.testing.assert_close(values.cpu(), ref_v, equal_nan=True, **VALUE_TOL[values.dtype])
    return values, indices


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,classes,k", SHAPES)
def test_matches_reference(device, dtype, rows, classes, k):
    check(torch.randn(rows, classes, device=device).mul(3).to(dtype), k)


@pytest.mark.parametrize("values_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperature_and_value_dtype(device, values_dtype, temperature):
    check(torch.randn(33, 1000, device=device) * 5, 20, temperature, values_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_lower_index(device, dtype):
    # Integer logits in a tiny range: almost every boundary is a tie.
    x = torch.randint(-3, 4, (64, 2000), device=device).to(dtype)
    values, indices = check(x, 50)
    # Within equal values, indices ascend.
    v, i = values.float().cpu(), indices.long().cpu()
    same = v[:, 1:] == v[:, :-1]
    assert (i[:, 1:][same] > i[:, :-1][same]).all()


def test_all_equal_row_picks_first_k(device):
    values, indices = check(torch.zeros(3, 500, device=device), 7)
    assert indices.tolist() == [list(range(7))] * 3
    torch.testing.assert_close(values.float().cpu(), torch.full((3, 7), 1 / 500), rtol=1e-3, atol=0)


def test_negative_zero_ties_with_zero(device):
    x = torch.full((1, 6), -1.0, device=device)
    x[0, 1] = -0.0
    x[0, 4] = 0.0
    _, indices = check(x, 3)
    assert indices[0, :2].tolist() == [1, 4]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_rows(device, dtype):
    x = torch.randn(6, 300, device=device).to(dtype)
    x[1, 17] = float("nan")
    x[2, 5] = float("inf")
    x[3] = float("-inf")
    x[4, :290] = float("-inf")  # -inf is a valid logit (probability 0)
    x[5, 3] = float("-inf")
    values, indices = check(x, 12)
    nan_rows = torch.isnan(values.float()).all(-1).cpu().tolist()
    assert nan_rows == [False, True, True, True, False, False]
    assert indices[1].tolist() == list(range(12))
    assert torch.isfinite(values[4].float()).all() and (indices[4] >= 290).sum() == 10
    with pytest.raises(ValueError, match="argument 'logits' has 3 row"):
        topk_softmax(x, 12, check_finite=True)


def test_strided_and_misaligned_inputs(device):
    base = torch.randn(40, 3003, device=device, dtype=torch.float16)
    check(base[::3, 1:], 31)                 # row stride != classes, start not 16-byte aligned
    check(base[:, 5:2005], 17)
    check(base.t()[:1000, :33].t(), 9)      # classes not contiguous: copied by the op
    check(torch.randn(2, 5, 4001, device=device), 3)  # leading dims are flattened and restored


def test_large_batch(device):
    check(torch.randn(4096, 1000, device=device, dtype=torch.bfloat16), 10)


def test_empty_batch(device):
    values, indices = topk_softmax(torch.randn(0, 50, device=device), 5)
    assert values.shape == indices.shape == (0, 5)


@pytest.mark.parametrize("args,exc,match", [
    ((torch.randn(4, 10, dtype=torch.float64), 3), TypeError, "argument 'logits' must have dtype"),
    ((torch.randint(0, 5, (4, 10)), 3), TypeError, "argument 'logits' must have dtype"),
    ((torch.randn(10), 3), ValueError, "argument 'logits' must be 2-D"),
    ((torch.randn(4, 10), 0), ValueError, "argument 'k' must be in"),
    ((torch.randn(4, 10), 11), ValueError, "argument 'k' must be in"),
    ((torch.randn(4, 3000), 2049), ValueError, "argument 'k' must be in"),
    ((torch.randn(4, 10), 3, 0.0), ValueError, "argument 'temperature'"),
    ((torch.randn(4, 10), 3, -1.0), ValueError, "argument 'temperature'"),
    ((torch.randn(4, 10), 3, float("nan")), ValueError, "argument 'temperature'"),
    ((torch.randn(4, 10), 3, 1e-39), ValueError, "argument 'temperature' must be at least"),
    ((torch.randn(4, 10), 3, 1.0, torch.bfloat16), TypeError, "argument 'values_dtype'"),
])
def test_bad_arguments_name_the_argument(args, exc, match, op_path):
    x = args[0]
    if x.dim() == 1:  # the wrapper flattens leading dims; call the op itself for the 1-D case
        with pytest.raises((exc, RuntimeError), match=match):
            torch.ops.vitfast.topk_softmax(*args)
        return
    with pytest.raises(exc, match=match):
        topk_softmax(*args)


def test_opcheck(device):
    x = torch.randn(9, 333, device=device, dtype=torch.float16)
    torch.library.opcheck(torch.ops.vitfast.topk_softmax.default, (x, 13))
    torch.library.opcheck(torch.ops.vitfast.topk_softmax.default, (x.float(), 5, 2.0, torch.float32))
    torch.library.opcheck(torch.ops.vitfast.topk_softmax.default, (torch.randn(3, 40000, device=device), 4))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        v, i = torch.ops.vitfast.topk_softmax(torch.empty(8, 40000, dtype=torch.bfloat16), 100)
        assert v.shape == (8, 100) and v.dtype == torch.float16 and i.dtype == torch.int32
        with pytest.raises(ValueError, match="argument 'k'"):
            torch.ops.vitfast.topk_softmax(torch.empty(8, 10), 11)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_values_have_the_softmax_gradient(device, temperature, monkeypatch):
    """values are differentiable in the logits (before: they required grad, and backward left the
    logits' grad None); the fused op and the fallback path give the reference's gradient (float32
    values: tight; float16 values round the incoming gradient itself to float16)."""
    x = (torch.randn(6, 300, device=device) * 3).requires_grad_()
    w = torch.randn(6, 10, device=device)
    x64 = x.detach().cpu().double().requires_grad_()
    p = torch.softmax(x64 / temperature, -1)
    idx = torch.sort(x64.detach(), dim=-1, descending=True, stable=True).indices[:, :10]
    (rg,) = torch.autograd.grad((p.gather(-1, idx) * w.cpu().double()).sum(), x64)

    def grad(values_dtype):
        (g,) = torch.autograd.grad((topk_softmax(x, 10, temperature, values_dtype)[0].float() * w).sum(), x)
        return g.cpu().double()

    torch.testing.assert_close(grad(torch.float32), rg, rtol=1e-4, atol=1e-6)
    g16 = grad(None)
    assert ((g16 - rg).norm() / rg.norm()).item() < 2e-3
    import vitfast._ext as ext

    import warnings

    monkeypatch.setattr(ext, "native", lambda device: False)  # the PyTorch fallback path (warns once)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(grad(torch.float32), rg, rtol=1e-4, atol=1e-6)


def test_opcheck_with_grad(device):
    x = torch.randn(5, 200, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vitfast.topk_softmax.default, (x, 7))
