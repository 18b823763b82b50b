"""vitfast.patch on timm models: the patched model is a peer of the original -- same outputs and
gradients (train and eval) for every swin_* (v1) and tiny_vit_* model timm registers, identical
state_dict, reversible, and it works under autocast, torch.compile and DDP."""
import copy
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vitfast
from vitfast.patching.swin import FusedWindowAttention
from vitfast.patching.tiny_vit import FusedTinyVitAttention

from conftest import HAS_CUDA

MODELS = timm.list_models("swin_*") + timm.list_models("tiny_vit_*")


def build(name, img_size, **kw):
    # drop_path 0 so both copies see the same network; swin takes any input size
    extra = {"img_size": img_size} if name.startswith("swin") else {}
    return timm.create_model(name, drop_path_rate=0.0, **extra, **kw)


def grads_close(a, b, rtol):
    """Per-parameter relative error, floored at 1e-3 of the largest gradient (gradients that are
    ~0 analytically, e.g. biases in front of a train-mode BatchNorm, are rounding noise)."""
    floor = 1e-3 * max(g.norm().item() for g in a)
    worst = max(((x - y).norm() / max(x.norm().item(), floor)).item() for x, y in zip(a, b))
    assert worst < rtol, worst


def peer_check(model, x, rtol_out, rtol_grad, train, **patch_kw):
    patched = vitfast.patch(copy.deepcopy(model), **patch_kw)
    assert vitfast.patched_modules(patched)
    model.train(train)
    patched.train(train)
    a, b = model(x), patched(x)
    assert ((a - b).norm() / a.norm()).item() < rtol_out
    ga = torch.autograd.grad(a.float().square().mean(), list(model.parameters()))
    gb = torch.autograd.grad(b.float().square().mean(), list(patched.parameters()))
    grads_close(ga, gb, rtol_grad)
    return patched


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [False, True])
def test_every_timm_model_is_a_peer(name, train):
    """The acceptance test: small inputs on CPU (windows that need padding, clamped windows, the
    feature-map path), float32."""
    torch.manual_seed(0)
    peer_check(build(name, 64), torch.randn(2, 3, 64, 64), 1e-5, 1e-4, train)


@pytest.mark.parametrize("name,size", [("swin_tiny_patch4_window7_224", 112), ("swin_s3_tiny_224", 128),
                                       ("tiny_vit_5m_224", 224)])
def test_feature_map_path_with_shift(name, size, monkeypatch):
    """Maps divisible by the window run whole through the kernel (shift included) and match."""
    calls = {"n": 0}
    for cls in (FusedWindowAttention, FusedTinyVitAttention):
        orig = cls.forward_grid

        def counted(self, *args, _orig=orig, **kw):
            calls["n"] += 1
            return _orig(self, *args, **kw)

        monkeypatch.setattr(cls, "forward_grid", counted)
    model = build(name, size)
    x = torch.randn(1, 3, size, size)
    peer_check(model, x, 1e-5, 1e-4, train=True)
    assert calls["n"] > 0
    # the partitioned (grid=False) path agrees too
    windowed = vitfast.patch(copy.deepcopy(model), grid=False).eval()
    torch.testing.assert_close(windowed(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_state_dict_identical_and_unpatch_restores():
    model = build("swin_tiny_patch4_window7_224", 64)
    classes = {n: type(m) for n, m in model.named_modules()}
    reference = copy.deepcopy(model.state_dict())
    vitfast.patch(model)
    assert vitfast.patched_modules(model) == vitfast.patchable(vitfast.unpatch(copy.deepcopy(model)))
    sd = model.state_dict()
    assert list(sd.keys()) == list(reference.keys())
    assert all(torch.equal(sd[k], reference[k]) for k in sd)
    # load before or after patching
    other = vitfast.patch(build("swin_tiny_patch4_window7_224", 64))
    other.load_state_dict(reference)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))
    vitfast.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not vitfast.patched_modules(model)
    assert not any("vitfast_grid" in m.__dict__ for m in model.modules())


def test_autocast_bf16():
    torch.manual_seed(0)
    model = build("tiny_vit_5m_224", 64)
    patched = vitfast.patch(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x), patched(x)
    assert b.dtype == a.dtype
    assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 3e-2
    b.float().square().mean().backward()
    table = patched.stages[1].blocks[0].attn.attention_biases
    assert table.grad is not None and table.grad.dtype == torch.float32 and torch.isfinite(table.grad).all()


def test_torch_compile_patched_model():
    torch.manual_seed(0)
    model = build("swin_tiny_patch4_window7_224", 64, depths=(2, 2, 2, 2)).train()
    patched = vitfast.patch(copy.deepcopy(model))
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(patched)
    out = compiled(x)
    out.square().mean().backward()
    ref = model(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads_close([p.grad for p in model.parameters()], [p.grad for p in patched.parameters()], 1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, x, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = vitfast.patch(build("swin_tiny_patch4_window7_224", 64, depths=(2, 2, 2, 2)))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    shard = x.chunk(world)[rank]
    ddp(shard).square().mean().backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, "grads.pt"))
    dist.destroy_process_group()


def test_ddp_patched_model_matches_single_process(tmp_path):
    x = torch.randn(4, 3, 64, 64)
    mp.spawn(_ddp_worker, args=(2, _free_port(), x, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build("swin_tiny_patch4_window7_224", 64, depths=(2, 2, 2, 2))
    # DDP averages the ranks' mean-loss gradients = the full batch's mean over equal shards
    sum(model(s).square().mean() for s in x.chunk(2)).div(2).backward()
    grads_close([p.grad for p in model.parameters()], torch.load(tmp_path / "grads.pt"), 1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("name", MODELS)
def test_every_timm_model_is_a_peer_on_gpu_at_224(name, monkeypatch):
    """GPU acceptance: every model at 224, float32 (SIMT kernels) and bf16 autocast (tensor cores).
    cuDNN convolutions run in TF32 by default: the float32 check turns that off. The first H100 run
    failed the five TinyViT models here (their messages were lost to a crash later in that run) and
    passed every Swin: TinyViT's convolutions (MBConv, every block's local conv) see the attention's
    ~1e-7 differences, which TF32 rounding can turn into ~1e-3 flips; Swin's one convolution sees
    identical inputs. The suspected cause, to be confirmed by the next run."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = build(name, 224).cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    peer_check(model, x, 1e-4, 1e-3, train=True)
    patched = vitfast.patch(copy.deepcopy(model))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model(x), patched(x)
    assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 3e-2
