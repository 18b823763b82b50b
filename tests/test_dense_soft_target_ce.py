"""dense_soft_target_cross_entropy against the float64 reference: loss, gradient, gradcheck,
registration (opcheck, fake tensors, torch.compile), edge values and bad input."""
import pytest
import torch

from vitfast.ops import dense_soft_target_cross_entropy
from vitfast.ops.dense_soft_target_ce import dense_soft_target_ce_with_grad
from vitfast.ops.reference import dense_soft_target_cross_entropy_reference as reference

from conftest import rel_err

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# the gradient is rounded once to the student's dtype; the loss accumulates in float32 or wider
GRAD_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}
LOSS_TOL = {torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float32: 1e-5, torch.float64: 1e-12}


def check(student, teacher, scales=(1.0, 1.0), reduction="mean"):
    x = student.detach().clone().requires_grad_()
    loss = dense_soft_target_cross_entropy(x, teacher, *scales, reduction=reduction)
    wide = torch.float64 in (student.dtype, teacher.dtype)
    assert loss.dtype == (torch.float64 if wide else torch.float32)
    weight = torch.rand_like(loss) if reduction == "none" else torch.ones_like(loss)
    (grad,) = torch.autograd.grad((loss * weight).sum(), x)
    x64 = student.detach().cpu().double().requires_grad_()
    ref = reference(x64, teacher.cpu(), *scales, reduction)
    (ref_grad,) = torch.autograd.grad((ref * weight.cpu().double()).sum(), x64)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    # float64 math when either side is float64 (of the student's own, already rounded values)
    assert rel_err(loss.cpu(), ref) < (1e-12 if wide else LOSS_TOL[student.dtype])
    assert rel_err(grad.cpu(), ref_grad) < GRAD_TOL[student.dtype]


def pair(rows, classes, dtype, device, spread=3.0):
    return ((torch.randn(rows, classes, device=device) * spread).to(dtype),
            (torch.randn(rows, classes, device=device) * spread).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,classes", [(1, 1), (3, 7), (40, 49), (37, 197), (9, 1024), (5, 1025), (3, 21841)])
def test_matches_reference(device, dtype, rows, classes):
    check(*pair(rows, classes, dtype, device))


@pytest.mark.parametrize("scales", [(0.125, 0.125), (0.25, 2.0), (1 / 4.0, 1 / 4.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_scales_and_reductions(device, scales, reduction):
    check(*pair(33, 300, torch.float32, device), scales, reduction)


@pytest.mark.parametrize("teacher_dtype", DTYPES)
def test_teacher_in_its_own_dtype(device, teacher_dtype):
    s, t = pair(11, 197, torch.bfloat16, device)
    check(s, t.float().to(teacher_dtype))


def test_strided_rows(device):
    base = torch.randn(30, 1203, device=device, dtype=torch.float16)
    t = torch.randn(15, 1200, device=device)
    check(base[::2, 3:], t)  # row stride != classes, misaligned start
    check(base.t().contiguous().t()[:15, :1200], t)  # column-major: copied by the op


@pytest.mark.parametrize("shape", [(10,), (2, 3, 10), (2, 0, 10)])
def test_leading_dims(device, shape):
    """(..., C): any leading dims, the per-row loss shaped like them (token-level distillation)."""
    s, t = torch.randn(*shape, device=device), torch.randn(*shape, device=device)
    x = s.clone().requires_grad_()
    loss = dense_soft_target_cross_entropy(x, t, 0.5, 0.5, reduction="none")
    assert loss.shape == shape[:-1]
    loss.sum().backward()
    x64 = s.cpu().double().requires_grad_()
    ref = reference(x64, t.cpu(), 0.5, 0.5, "none")
    ref.sum().backward()
    torch.testing.assert_close(loss.cpu().double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-5, atol=1e-6)
    mean = dense_soft_target_cross_entropy(s, t, 0.5, 0.5)
    if loss.numel():
        torch.testing.assert_close(mean, loss.mean())


def test_is_kd_cross_entropy(device):
    """Independent of the reference's formula: -sum softmax(t / T) log_softmax(s / T), with the
    KL divergence's entropy term it differs from F.kl_div by exactly H(teacher)."""
    s, t = pair(8, 100, torch.float64, device)
    T = 4.0
    q = torch.softmax(t / T, -1)
    got = dense_soft_target_cross_entropy(s, t, 1 / T, 1 / T, reduction="none")
    torch.testing.assert_close(got, -(q * torch.log_softmax(s / T, -1)).sum(-1), rtol=1e-12, atol=1e-12)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), q, reduction="none").sum(-1)
    torch.testing.assert_close(got, kl - (q * q.log()).sum(-1), rtol=1e-10, atol=1e-10)


def test_gradcheck_float64(device):
    s, t = pair(4, 37, torch.float64, device)
    s.requires_grad_()
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda z: dense_soft_target_cross_entropy(z, t, 0.5, 2.0, reduction=reduction), (s,))


def test_neg_inf_entries(device):
    """Teacher -inf: probability 0, adds nothing even where the student is -inf too; a student -inf
    where the teacher has mass: infinite loss."""
    s, t = pair(3, 50, torch.float32, device)
    t[:, ::5] = float("-inf")
    s[0, ::10] = float("-inf")  # only where the teacher is -inf
    s[2, 1] = float("-inf")     # where the teacher has mass
    loss = dense_soft_target_cross_entropy(s, t, reduction="none")
    assert torch.isfinite(loss[:2]).all() and loss[2].item() == float("inf")
    ref = reference(s.cpu().double(), t.cpu(), reduction="none")
    torch.testing.assert_close(loss[:2].cpu().double(), ref[:2], rtol=1e-5, atol=1e-6)
    x = s[:2].clone().requires_grad_()
    dense_soft_target_cross_entropy(x, t[:2], reduction="sum").backward()
    x64 = s[:2].cpu().double().requires_grad_()
    reference(x64, t[:2].cpu(), reduction="sum").backward()
    g = x.grad.cpu().double()
    finite = torch.isfinite(x64.grad)
    assert torch.equal(torch.isfinite(g), finite)
    assert rel_err(g[finite], x64.grad[finite]) < 1e-5


def test_rows_without_a_distribution_are_nan(device):
    """A teacher row with no finite logit (or a NaN) has no softmax, nor does a student row of
    -inf or one with +inf: loss and gradient NaN, like the reference -- never a plausible-looking
    gradient."""
    for cols in (30, 3000):  # a warp per row on CUDA, and a block per row
        s, t = pair(5, cols, torch.float32, device)
        t[0] = float("-inf")
        t[1, 3] = float("nan")
        s[2] = float("-inf")
        s[3, cols - 1] = float("inf")
        x = s.clone().requires_grad_()
        loss = dense_soft_target_cross_entropy(x, t, reduction="none")
        loss.sum().backward()
        assert torch.isnan(loss[:4]).all() and torch.isfinite(loss[4])
        assert torch.isnan(x.grad[:4]).all(-1).all() and torch.isfinite(x.grad[4]).all()
        ref = reference(s.cpu().double(), t.cpu(), reduction="none")
        assert torch.isnan(ref[:4]).all()
        torch.testing.assert_close(loss[4].cpu().double(), ref[4], rtol=1e-5, atol=0)


@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_large_float32_logits(device, offset):
    """Logits near 1e4: the loss and the exponents are taken relative to the row (no rounded lse
    near the max), so float32 keeps its precision at the spread of the logits."""
    s = torch.randn(16, 300, device=device) * 3 + offset
    t = torch.randn(16, 300, device=device) * 3 + offset
    check(s, t, reduction="none")


def test_with_grad_helper_matches_autograd(device):
    s, t = pair(20, 197, torch.float32, device)
    loss, grad = dense_soft_target_ce_with_grad(s, t, 0.3, 0.2)
    x = s.clone().requires_grad_()
    ref = dense_soft_target_cross_entropy(x, t, 0.3, 0.2, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.sum(), ref)
    torch.testing.assert_close(grad, x.grad)
    loss2, none = dense_soft_target_ce_with_grad(s, t, 0.3, 0.2, want_grad=False)
    assert none.numel() == 0
    torch.testing.assert_close(loss2, loss)


def test_no_gradient_kept_without_grad(device):
    s, t = pair(6, 40, torch.float32, device)
    with torch.no_grad():
        _, grad = torch.ops.vitfast.dense_soft_target_ce(s, t, 1.0, 1.0, False)
    assert grad.numel() == 0
    x = s.clone().requires_grad_()
    loss, _ = torch.ops.vitfast.dense_soft_target_ce(x, t, 1.0, 1.0, False)
    with pytest.raises(RuntimeError, match="not computed in the forward"):
        loss.sum().backward()


def test_opcheck(device):
    s, t = pair(7, 301, torch.float32, device)
    s.requires_grad_()
    torch.library.opcheck(torch.ops.vitfast.dense_soft_target_ce.default, (s, t, 0.5, 1.0, True))
    torch.library.opcheck(torch.ops.vitfast.dense_soft_target_ce.default, (s.detach(), t, 1.0, 1.0, False))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(8, 197, dtype=torch.bfloat16)
        loss, grad = torch.ops.vitfast.dense_soft_target_ce(s, torch.empty(8, 197), 1.0, 1.0, True)
        assert loss.shape == (8,) and loss.dtype == torch.float32 and grad.shape == s.shape
        assert grad.dtype == torch.bfloat16
        loss, grad = torch.ops.vitfast.dense_soft_target_ce(s, torch.empty(8, 197, dtype=torch.float64))
        assert loss.dtype == torch.float64 and grad.shape == (0,)
        with pytest.raises(ValueError, match="argument 'teacher_logits' must have the shape"):
            torch.ops.vitfast.dense_soft_target_ce(s, torch.empty(8, 196))


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    def step(s, t):
        return dense_soft_target_cross_entropy(s * 2, t, 0.5, 0.25)

    compiled = torch.compile(step, fullgraph=True)
    s, t = pair(12, 197, torch.float32, device)
    s.requires_grad_()
    loss = compiled(s, t)
    loss.backward()
    s2 = s.detach().clone().requires_grad_()
    ref = step(s2, t)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(s.grad, s2.grad)


@pytest.mark.parametrize("call,exc,match", [
    (lambda s, t: dense_soft_target_cross_entropy(s.int(), t), TypeError, "argument 'student_logits' must have dtype"),
    (lambda s, t: dense_soft_target_cross_entropy(s, t.long()), TypeError, "argument 'teacher_logits' must have dtype"),
    (lambda s, t: dense_soft_target_cross_entropy(s[0, 0], t[0, 0]), ValueError, "argument 'student_logits' must have a class dim"),
    (lambda s, t: dense_soft_target_cross_entropy(s.reshape(2, 2, 10), t), ValueError, "argument 'teacher_logits' must have the shape"),
    (lambda s, t: dense_soft_target_cross_entropy(s, t[:, :9]), ValueError, "argument 'teacher_logits' must have the shape"),
    (lambda s, t: dense_soft_target_cross_entropy(s[:, :0], t[:, :0]), ValueError, "argument 'student_logits' must have between"),
    (lambda s, t: dense_soft_target_cross_entropy(s, t, 0.0), ValueError, "argument 'student_scale'"),
    (lambda s, t: dense_soft_target_cross_entropy(s, t, 1.0, float("inf")), ValueError, "argument 'teacher_scale'"),
    (lambda s, t: dense_soft_target_cross_entropy(s, t, reduction="avg"), ValueError, "argument 'reduction'"),
    (lambda s, t: dense_soft_target_cross_entropy(s, t.requires_grad_()), ValueError, "argument 'teacher_logits' must not require grad"),
])
def test_bad_arguments_name_the_argument(call, exc, match, op_path):
    with pytest.raises(exc, match=match):
        call(torch.randn(4, 10), torch.randn(4, 10))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match="argument 'teacher_logits' must be on the same device"):
        dense_soft_target_cross_entropy(torch.randn(4, 50, device="cuda"), torch.randn(4, 50))


def test_empty_batch(device):
    s = torch.randn(0, 10, device=device, requires_grad=True)
    loss = dense_soft_target_cross_entropy(s, torch.randn(0, 10, device=device), reduction="sum")
    loss.backward()
    assert loss.item() == 0 and s.grad.shape == (0, 10)
