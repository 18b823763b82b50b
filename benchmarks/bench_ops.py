"""pytest-benchmark timings of each op and its PyTorch baseline, on CPU and (when present) CUDA.

    python -m pytest benchmarks/bench_ops.py --benchmark-json=bench.json

For the same-run GPU ratios against the strongest baselines, with memory, see run_gpu.py.
"""
import pytest
import torch

from vitfast import sparse_soft_target_cross_entropy, topk_softmax
from vitfast.ops.reference import sparse_soft_target_dense

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(1024, 21841, 100), (1024, 1000, 10)]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.mark.parametrize("b,c,k", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["vitfast", "torch"])
def test_topk_softmax(benchmark, device, impl, b, c, k):
    x = torch.randn(b, c, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
    fn = (lambda: topk_softmax(x, k)) if impl == "vitfast" else (lambda: torch.softmax(x.float(), -1).topk(k))

    def run():
        fn()
        sync(device)

    benchmark(run)


@pytest.mark.parametrize("b,c,k", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["vitfast", "torch"])
def test_soft_target_ce_fwd_bwd(benchmark, device, impl, b, c, k):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    values, indices = topk_softmax(torch.randn(b, c, device=device), k)
    x = torch.randn(b, c, device=device, dtype=dtype, requires_grad=True)

    def run():
        if impl == "vitfast":
            loss = sparse_soft_target_cross_entropy(x, values, indices, c)
        else:
            t = sparse_soft_target_dense(values, indices, c, torch.float32)
            loss = -(t * torch.log_softmax(x.float(), -1)).sum(-1).mean()
        torch.autograd.grad(loss, x)
        sync(device)

    benchmark(run)


@pytest.mark.parametrize("impl", ["vitfast", "sdpa"])
def test_window_attention_fwd_bwd(benchmark, device, impl):
    """Swin-T stage-1 windows with bias and shift mask (8192 windows on CUDA, 256 on CPU)."""
    import torch.nn.functional as F

    from vitfast.ops import window_attention

    windows, heads, n, d = (8192 if device == "cuda" else 256), 3, 49, 32
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qkv = torch.randn(windows, n, 3 * heads * d, device=device, dtype=dtype, requires_grad=True)
    table = torch.randn(heads, 169, device=device, requires_grad=True)
    index = torch.randint(0, 169, (n, n), device=device)
    mask = torch.where(torch.rand(64, n, n, device=device) < 0.5, -100.0, 0.0)

    def ours():
        return window_attention(qkv, heads, d, bias_table=table, bias_index=index, mask=mask)

    def sdpa():
        q, k, v = qkv.reshape(windows, n, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        bias = table[:, index] + mask.repeat(windows // 64, 1, 1)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dtype)).transpose(1, 2).reshape(windows, n, -1)

    fn = ours if impl == "vitfast" else sdpa

    def run():
        torch.autograd.grad(fn().float().sum(), (qkv, table))
        sync(device)

    benchmark(run)
