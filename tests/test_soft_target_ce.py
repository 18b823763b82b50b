"""sparse_soft_target_cross_entropy against the dense float64 reference: loss, gradient,
gradcheck, registration, torch.compile and bad input."""
import pytest
import torch

from vitfast import sparse_soft_target_cross_entropy, topk_softmax
from vitfast.ops.reference import sparse_soft_target_cross_entropy_reference, sparse_soft_target_dense

from conftest import rel_err

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# relative error of the gradient against float64: one rounding to the logits dtype
GRAD_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}
LOSS_TOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-5, torch.float64: 1e-12}


def teacher(rows, classes, k, device, values_dtype=torch.float16, index_dtype=None):
    """Sparse targets as topk_softmax makes them, optionally re-typed."""
    values, indices = topk_softmax(torch.randn(rows, classes, device=device) * 3, k)
    return values.to(values_dtype), (indices if index_dtype is None else indices.to(index_dtype))


def check(logits, values, indices, reduction="mean"):
    classes = logits.shape[1]
    x = logits.detach().clone().requires_grad_()
    loss = sparse_soft_target_cross_entropy(x, values, indices, classes, reduction)
    assert loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    weight = torch.rand_like(loss) if reduction == "none" else torch.ones_like(loss)
    (grad,) = torch.autograd.grad((loss * weight).sum(), x)
    x64 = logits.detach().cpu().double().requires_grad_()
    ref = sparse_soft_target_cross_entropy_reference(x64, values.cpu(), indices.cpu(), classes, reduction)
    (ref_grad,) = torch.autograd.grad((ref * weight.cpu().double()).sum(), x64)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert rel_err(loss.cpu(), ref) < LOSS_TOL[logits.dtype]
    assert rel_err(grad.cpu(), ref_grad) < GRAD_TOL[logits.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,classes,k", [(1, 1, 1), (3, 7, 1), (5, 7, 7), (17, 1000, 10), (4, 21841, 100),
                                             (2, 40000, 128), (2, 3000, 2048)])
def test_matches_reference(device, dtype, rows, classes, k):
    values, indices = teacher(rows, classes, k, device)
    check((torch.randn(rows, classes, device=device) * 2).to(dtype), values, indices)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(device, reduction):
    values, indices = teacher(33, 500, 20, device)
    check(torch.randn(33, 500, device=device), values, indices, reduction)


@pytest.mark.parametrize("values_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32, torch.int64])
def test_target_dtypes(device, values_dtype, index_dtype):
    values, indices = teacher(9, 300, 11, device, values_dtype, index_dtype)
    check(torch.randn(9, 300, device=device), values, indices)


def test_large_batch(device):
    values, indices = teacher(2048, 1000, 10, device)
    check(torch.randn(2048, 1000, device=device, dtype=torch.bfloat16), values, indices)


def test_strided_logits(device):
    base = torch.randn(30, 1203, device=device, dtype=torch.float16)
    x = base[::2, 3:]  # row stride != classes, misaligned start
    values, indices = teacher(15, 1200, 9, device)
    check(x, values, indices)
    check(base.t().contiguous().t()[:15, :1200], values, indices)  # column-major: copied by the op


def test_loss_is_cross_entropy_of_dense_target(device):
    # Independent of the reference's formula: explicit -sum t log p with the dense target.
    values, indices = teacher(6, 50, 5, device, torch.float32)
    x = torch.randn(6, 50, device=device, dtype=torch.float64)
    t = sparse_soft_target_dense(values, indices, 50).to(device)
    assert torch.allclose(t.sum(-1), torch.ones(6, dtype=torch.float64, device=device), atol=1e-6)
    expected = -(t * torch.log_softmax(x, -1)).sum(-1)
    got = sparse_soft_target_cross_entropy(x, values, indices, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(device):
    values, indices = teacher(4, 37, 6, device, torch.float64)
    x = torch.randn(4, 37, device=device, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda z: sparse_soft_target_cross_entropy(z, values, indices, reduction=reduction), (x,))


def test_neg_inf_logit_gives_inf_loss(device):
    values, indices = teacher(2, 20, 3, device, torch.float32)
    x = torch.randn(2, 20, device=device)
    mask = torch.ones(20, dtype=torch.bool, device=device)
    mask[indices[0].long()] = False
    x[0, mask.nonzero()[0]] = float("-inf")  # a class with target mass u > 0 and probability 0
    loss = sparse_soft_target_cross_entropy(x, values, indices, reduction="none")
    assert loss[0].item() == float("inf") and torch.isfinite(loss[1])


def test_opcheck(device):
    values, indices = teacher(7, 301, 13, device)
    x = torch.randn(7, 301, device=device, dtype=torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.vitfast.sparse_soft_target_ce_forward.default, (x, values, indices, 301))
    _, lse = torch.ops.vitfast.sparse_soft_target_ce_forward(x.detach(), values, indices, 301)
    g = torch.rand(7, device=device)
    torch.library.opcheck(torch.ops.vitfast.sparse_soft_target_ce_backward.default, (g, x.detach(), values, indices, lse))


def test_autograd_is_the_cpp_kernel():
    """The forward op's autograd is registered in C++ (one dispatcher call per step, no Python
    wrapper: the host cost the GPU run measured), for every backend."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vitfast::sparse_soft_target_ce_forward", "Autograd")
    x = torch.randn(3, 7, requires_grad=True)
    v, i = torch.full((3, 2), 0.3), torch.tensor([[0, 1], [2, 3], [4, 5]])
    loss = sparse_soft_target_cross_entropy(x, v, i)
    assert type(loss.grad_fn.next_functions[0][0]).__name__ == "CppFunction"  # not a Python BackwardCFunction


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(8, 1000, dtype=torch.bfloat16)
        loss, lse = torch.ops.vitfast.sparse_soft_target_ce_forward(
            x, torch.empty(8, 10, dtype=torch.float16), torch.empty(8, 10, dtype=torch.int16), 1000)
        assert loss.shape == lse.shape == (8,) and loss.dtype == torch.float32
        with pytest.raises(ValueError, match="argument 'num_classes'"):
            torch.ops.vitfast.sparse_soft_target_ce_forward(
                x, torch.empty(8, 10, dtype=torch.float16), torch.empty(8, 10, dtype=torch.int16), 999)


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    """Teacher compression and student loss in one compiled graph, forward and backward."""
    def step(teacher_logits, student_logits):
        values, indices = topk_softmax(teacher_logits, 16)
        return sparse_soft_target_cross_entropy(student_logits, values, indices)

    compiled = torch.compile(step, fullgraph=True)
    t = torch.randn(12, 400, device=device)
    s = torch.randn(12, 400, device=device, requires_grad=True)
    loss = compiled(t, s)
    loss.backward()
    s2 = s.detach().clone().requires_grad_()
    ref = step(t, s2)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(s.grad, s2.grad)


def bad_index_cases(device):
    values, indices = teacher(4, 50, 5, device)
    dup = indices.clone()
    dup[2, 3] = dup[2, 0]
    high = indices.clone()
    high[1, 4] = 50
    neg = indices.long().clone()
    neg[3, 0] = -1
    return values, [(dup, "row 2"), (high, "row 1"), (neg, "row 3")]


def test_bad_indices_cpu():
    values, cases = bad_index_cases("cpu")
    for idx, row in cases:
        with pytest.raises(ValueError, match=f"argument 'indices' {row} has an entry out of"):
            sparse_soft_target_cross_entropy(torch.randn(4, 50), values, idx)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, v, i: sparse_soft_target_cross_entropy(x.int(), v, i), TypeError, "argument 'student_logits'"),
    (lambda x, v, i: sparse_soft_target_cross_entropy(x[0], v, i), ValueError, "argument 'student_logits' must be 2-D"),
    (lambda x, v, i: sparse_soft_target_cross_entropy(x, v.int(), i), TypeError, "argument 'values' must have dtype"),
    (lambda x, v, i: sparse_soft_target_cross_entropy(x, v, i.float()), TypeError, "argument 'indices' must have dtype"),
    (lambda x, v, i: sparse_soft_target_cross_entropy(x, v[:3], i[:3]), ValueError, "argument 'values' must have shape"),
    (lambda x, v, i: sparse_soft_target_cross_entropy(x, v, i[:, :4]), ValueError, "argument 'indices' must have the shape"),
    (lambda x, v, i: sparse_soft_target_cross_entropy(x[:, :4], v, i), ValueError, "argument 'values' must hold k"),
    (lambda x, v, i: sparse_soft_target_cross_entropy(x, v, i, 49), ValueError, "argument 'num_classes'"),
    (lambda x, v, i: sparse_soft_target_cross_entropy(x, v, i, reduction="avg"), ValueError, "argument 'reduction'"),
])
def test_bad_arguments_name_the_argument(call, exc, match, op_path):
    values, indices = teacher(4, 50, 5, "cpu")
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 50), values, indices)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_rejected():
    values, indices = teacher(4, 50, 5, "cpu")
    with pytest.raises(ValueError, match="argument 'values' must be on the same device"):
        sparse_soft_target_cross_entropy(torch.randn(4, 50, device="cuda"), values, indices.cuda())


@pytest.mark.parametrize("offset", [1e4, -3e4, 2e5])
def test_large_float32_logits_keep_gradient_precision(device, offset):
    """Logits around 1e4 and beyond: the saved log-sum-exp is float64, so the gradient is as
    exact as float32 allows (PyTorch's own cross-entropy reaches ~1e-7 here; a float32 lse
    gave 3.7e-5)."""
    logits = (torch.randn(64, 1000, device=device) * 3 + offset).float()
    values, indices = teacher(64, 1000, 10, device)
    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(sparse_soft_target_cross_entropy(x, values, indices, reduction="sum"), x)
    x64 = logits.cpu().double().requires_grad_()
    ref = sparse_soft_target_cross_entropy_reference(x64, values.cpu(), indices.cpu(), 1000, "sum")
    (ref_grad,) = torch.autograd.grad(ref, x64)
    # the reference sees the same float32 logits: only the op's own rounding differs
    assert rel_err(grad.cpu(), ref_grad) < 1e-6
    _, lse = torch.ops.vitfast.sparse_soft_target_ce_forward(logits, values, indices, 1000)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(logits.cpu().double(), -1), rtol=0, atol=1e-9 * abs(offset))
