"""covariance_update_ / CovarianceAccumulator against float64 statistics of all rows at once."""
import pytest
import torch

from vitfast.ops import CovarianceAccumulator, covariance_update_
from vitfast.ops.covariance import symmetric_m2

from conftest import rel_err

# relative error of the covariance vs float64 (inputs are exact in their dtype; the CPU path
# computes in float64, the CUDA path multiplies in fp32 and accumulates in float64)
TOL = {"cpu": 1e-12, "cuda": 1e-5}


def features(rows, m, device, dtype=torch.float32, mean_scale=100.0):
    """Rows with large means (mean ~100x the spread) and correlated, decaying spectrum."""
    basis = torch.randn(m, m, dtype=torch.float64) / m**0.5
    scales = torch.logspace(0, -3, m, dtype=torch.float64)
    y = (torch.randn(rows, m, dtype=torch.float64) * scales) @ basis + mean_scale * torch.rand(m, dtype=torch.float64)
    return y.to(dtype).to(device)


def exact(y):
    yd = y.double().cpu()
    mu = yd.mean(0)
    return ((yd - mu).T @ (yd - mu)) / yd.shape[0], mu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 7, 64, 130])
def test_streaming_matches_exact(device, dtype, m):
    batches = [features(n, m, device, dtype, mean_scale=10.0 if dtype == torch.float16 else 100.0)
               for n in (1, 37, 500, 1030, 3)]
    acc = CovarianceAccumulator(m, device)
    for b in batches:
        acc.update(b)
    cov, mu = exact(torch.cat(batches))
    assert acc.count.item() == sum(b.shape[0] for b in batches)
    assert rel_err(acc.covariance().cpu(), cov) < TOL[device.type]
    assert rel_err(acc.mean.cpu(), mu) < 1e-12


def test_large_means_do_not_cancel(device):
    # E[yy^T] - mu mu^T in fp32 would lose every digit here; the centred update keeps them.
    y = features(4096, 96, device, torch.float32, mean_scale=1000.0)
    acc = CovarianceAccumulator(96, device)
    for part in y.split(1000):
        acc.update(part)
    cov, _ = exact(y)
    assert rel_err(acc.covariance().cpu(), cov) < TOL[device.type]
    naive = (y.T @ y / y.shape[0] - torch.outer(y.mean(0), y.mean(0))).double().cpu()
    assert rel_err(naive, cov) > 1e-3  # the failure mode the kernel avoids is real on this data
    eig = torch.linalg.eigvalsh(acc.covariance().cpu())
    assert eig.min() > -1e-9 * eig.max()


def test_leading_dims_and_merge(device):
    a, b = features(300, 20, device), features(200, 20, device)
    acc1, acc2 = CovarianceAccumulator(20, device), CovarianceAccumulator(20, device)
    acc1.update(a.reshape(3, 100, 20))
    acc2.update(b)
    acc1.merge(acc2)
    cov, mu = exact(torch.cat([a, b]))
    assert rel_err(acc1.covariance().cpu(), cov) < TOL[device.type]
    assert rel_err(acc1.mean.cpu(), mu) < 1e-12
    assert rel_err(acc1.second_moment().cpu(), cov + torch.outer(mu, mu)) < 1e-10


def test_op_on_state_tensors_and_opcheck(device):
    m = 33
    count = torch.zeros((), dtype=torch.float64, device=device)
    mean = torch.zeros(m, dtype=torch.float64, device=device)
    m2 = torch.zeros(m, m, dtype=torch.float64, device=device)
    y = features(100, m, device)
    covariance_update_(count, mean, m2, y)
    cov, _ = exact(y)
    assert rel_err(symmetric_m2(m2).cpu() / 100, cov) < TOL[device.type]
    torch.library.opcheck(torch.ops.vitfast.covariance_update_.default, (count, mean, m2, y))
    torch.library.opcheck(torch.ops.vitfast.covariance_update_.default, (count, mean, m2, y, "simt"))


def test_torch_compile_fullgraph(device):
    acc = CovarianceAccumulator(16, device)

    @torch.compile(fullgraph=True)
    def step(count, mean, m2, y):
        torch.ops.vitfast.covariance_update_(count, mean, m2, torch.relu(y))

    ys = [features(64, 16, device) - 50 for _ in range(3)]
    for y in ys:
        step(acc.count, acc.mean, acc.m2, y)
    cov, _ = exact(torch.relu(torch.cat(ys)))
    assert rel_err(acc.covariance().cpu(), cov) < TOL[device.type]


@pytest.mark.parametrize("call,exc,match", [
    (lambda c, mu, m2, y: covariance_update_(c, mu, m2, y[0]), ValueError, "argument 'y' must be 2-D"),
    (lambda c, mu, m2, y: covariance_update_(c, mu, m2, y.int()), TypeError, "argument 'y' must have dtype"),
    (lambda c, mu, m2, y: covariance_update_(c.float(), mu, m2, y), TypeError, "argument 'count'"),
    (lambda c, mu, m2, y: covariance_update_(c, mu.float(), m2, y), TypeError, "argument 'mean' must be float64"),
    (lambda c, mu, m2, y: covariance_update_(c, mu[:3], m2, y), ValueError, "argument 'mean' must be a contiguous"),
    (lambda c, mu, m2, y: covariance_update_(c, mu, m2[:, :4], y), ValueError, "argument 'm2' must be a contiguous"),
    (lambda c, mu, m2, y: covariance_update_(c, mu, m2, y, "fast"), ValueError, "argument 'method'"),
    (lambda c, mu, m2, y: torch.ops.vitfast.covariance_update_(c, mu, m2, y, "fast"), ValueError, "argument 'method'"),
    (lambda c, mu, m2, y: CovarianceAccumulator(5, method="gemm"), ValueError, "argument 'method'"),
])
def test_bad_arguments_name_the_argument(call, exc, match, op_path):
    c, mu, m2 = torch.zeros((), dtype=torch.float64), torch.zeros(5, dtype=torch.float64), torch.zeros(5, 5, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        call(c, mu, m2, torch.randn(10, 5))


def test_accumulator_errors():
    with pytest.raises(ValueError, match="argument 'num_features'"):
        CovarianceAccumulator(0)
    acc = CovarianceAccumulator(4)
    with pytest.raises(ValueError, match="argument 'y' must have 4 features"):
        acc.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="too few"):
        acc.covariance()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["split_gemm", "tensor_core", "simt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [7, 130, 515])
def test_cuda_methods_match_exact(method, dtype, m, monkeypatch):
    """Every CUDA route, streamed batches of odd sizes; split GEMM with several chunks per call."""
    if method != "simt" and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs sm_80+")
    monkeypatch.setenv("VITFAST_COVARIANCE_GEMM_ROWS", "256")
    batches = [features(n, m, "cuda", dtype, mean_scale=10.0 if dtype == torch.float16 else 100.0)
               for n in (1, 700, 2049, 3)]
    acc = CovarianceAccumulator(m, "cuda", method=method)
    for b in batches:
        acc.update(b)
    cov, mu = exact(torch.cat(batches))
    assert acc.count.item() == sum(b.shape[0] for b in batches)
    assert rel_err(acc.covariance().cpu(), cov) < TOL["cuda"]
    assert rel_err(acc.mean.cpu(), mu) < 1e-12


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("method", ["auto", "split_gemm", "tensor_core"])
def test_cuda_bar_shape_accuracy(method):
    """The issue's accuracy bar (fp32, large means, n=65536, m=3072: rel err <= 1e-5) for each
    tensor-core route (auto = split GEMM here); the hardware's fp32 accumulation is not IEEE
    round-to-nearest, so this is a GPU-only check."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("needs sm_80+")
    y = features(65536, 3072, "cuda", torch.float32, mean_scale=100.0)
    acc = CovarianceAccumulator(3072, "cuda", method=method)
    acc.update(y)
    yd = y.double()
    mu = yd.mean(0)
    ref = (yd - mu).T @ (yd - mu) / yd.shape[0]
    assert rel_err(acc.covariance(), ref) <= 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gemm_rows_environment_is_validated(monkeypatch):
    monkeypatch.setenv("VITFAST_COVARIANCE_GEMM_ROWS", "12")
    acc = CovarianceAccumulator(200, "cuda", method="split_gemm")
    with pytest.raises(ValueError, match="VITFAST_COVARIANCE_GEMM_ROWS"):
        acc.update(torch.randn(10, 200, device="cuda"))
