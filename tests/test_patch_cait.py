"""vitfast.patch on timm's CaiT: TalkingHeadAttn runs on head_mix_attention and the patched model is
a peer of the original (outputs and every parameter's gradient, train and eval) for every cait_*
model timm registers; state_dict unchanged, unpatch restores, autocast, torch.compile, DDP."""
import copy
import os
import warnings

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vitfast
from vitfast.patching.cait import FusedTalkingHeadAttn

from conftest import HAS_CUDA
from test_patch import _free_port, grads_close, peer_check

MODELS = timm.list_models("cait_*")


def build(name, img_size, **kw):
    return timm.create_model(name, img_size=img_size, drop_path_rate=0.0, **kw)


def test_registry_has_cait_models():
    assert len(MODELS) >= 10  # timm 1.0: xxs24/36, xs24, s24/36, m36/48 at 224/384/448


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [False, True])
def test_every_cait_model_is_a_peer(name, train):
    """Small inputs on CPU (48 px: 9 patch tokens), float32, registry depths and widths."""
    torch.manual_seed(0)
    model = build(name, 48)
    # LayerScale starts at 1e-5..1e-6, which would hide the attention in the output: use 1 here
    for m in model.modules():
        if hasattr(m, "gamma_1"):
            m.gamma_1.data.fill_(1.0)
            m.gamma_2.data.fill_(1.0)
    patched = peer_check(model, torch.randn(2, 3, 48, 48), 1e-5, 1e-4, train)
    fused = [m for m in patched.modules() if isinstance(m, FusedTalkingHeadAttn)]
    assert len(fused) == len(model.blocks)


@pytest.mark.parametrize("train", [False, True])
def test_sdpa_route_is_a_peer(train, monkeypatch):
    """patch(model, head_mix_impl="sdpa") runs the SDPA route (and only it) and stays a peer."""
    import sys

    hm = sys.modules["vitfast.ops.head_mix_attention"]  # the module (the package attribute is the function)
    torch.manual_seed(0)
    model = build("cait_xxs24_224", 48, depth=3)
    for m in model.modules():
        if hasattr(m, "gamma_1"):
            m.gamma_1.data.fill_(1.0)
            m.gamma_2.data.fill_(1.0)
    calls = []
    real = hm.head_mix_attention_sdpa
    monkeypatch.setattr(hm, "head_mix_attention_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
    patched = peer_check(model, torch.randn(2, 3, 48, 48), 1e-5, 1e-4, train, head_mix_impl="sdpa")
    assert len(calls) == 3
    assert all(m.vitfast_head_mix_impl == "sdpa" for m in patched.modules() if isinstance(m, FusedTalkingHeadAttn))
    with pytest.raises(ValueError, match="argument 'head_mix_impl'"):
        vitfast.patch(model, head_mix_impl="flash")


def test_state_dict_identical_and_unpatch_restores():
    model = build("cait_xxs24_224", 48, depth=2)
    reference = copy.deepcopy(model.state_dict())
    classes = {n: type(m) for n, m in model.named_modules()}
    vitfast.patch(model)
    assert len(vitfast.patched_modules(model)) == 2
    sd = model.state_dict()
    assert list(sd) == list(reference) and all(torch.equal(sd[k], reference[k]) for k in sd)
    other = vitfast.patch(build("cait_xxs24_224", 48, depth=2))
    other.load_state_dict(reference)
    x = torch.randn(1, 3, 48, 48)
    torch.testing.assert_close(other.eval()(x), model.eval()(x))
    vitfast.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_attention_dropout_in_training_takes_timms_path():
    model = build("cait_xxs24_224", 48, depth=2, attn_drop_rate=0.1).train()
    vitfast.patch(model)
    torch.manual_seed(1)
    a = model(torch.randn(2, 3, 48, 48))
    vitfast.unpatch(model)
    torch.manual_seed(1)
    b = model(torch.randn(2, 3, 48, 48))
    torch.testing.assert_close(a, b)


def test_autocast_bf16():
    torch.manual_seed(0)
    model = build("cait_xxs24_224", 48, depth=4)
    patched = vitfast.patch(copy.deepcopy(model))
    x = torch.randn(2, 3, 48, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = model(x), patched(x)
    assert b.dtype == a.dtype
    assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 3e-2
    b.float().square().mean().backward()
    w = patched.blocks[0].attn.proj_l.weight
    assert w.grad is not None and w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.slow
def test_torch_compile_patched_model():
    torch.manual_seed(0)
    model = build("cait_xxs24_224", 48, depth=2).train()
    patched = vitfast.patch(copy.deepcopy(model))
    x = torch.randn(2, 3, 48, 48)
    out = torch.compile(patched, fullgraph=True)(x)
    out.square().mean().backward()
    ref = model(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grads_close([p.grad for p in model.parameters()], [p.grad for p in patched.parameters()], 1e-4)


def _ddp_worker(rank, world, port, x, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = vitfast.patch(build("cait_xxs24_224", 48, depth=2))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp(x.chunk(world)[rank]).square().mean().backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], os.path.join(out_dir, "grads.pt"))
    dist.destroy_process_group()


def test_ddp_patched_model_matches_single_process(tmp_path):
    x = torch.randn(4, 3, 48, 48)
    mp.spawn(_ddp_worker, args=(2, _free_port(), x, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = build("cait_xxs24_224", 48, depth=2)
    sum(model(s).square().mean() for s in x.chunk(2)).div(2).backward()
    grads_close([p.grad for p in model.parameters()], torch.load(tmp_path / "grads.pt"), 1e-4)


def test_patch_warns_when_nothing_to_patch():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.warns(RuntimeWarning, match="no module vitfast can fuse"):
        vitfast.patch(model)
    cait = build("cait_xxs24_224", 48, depth=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vitfast.patch(cait)
        vitfast.patch(cait)  # already patched: nothing new, no warning either


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("name", MODELS)
def test_every_cait_model_is_a_peer_on_gpu_at_native_resolution(name, monkeypatch):
    """GPU acceptance: native resolution, float32 (SIMT kernels) and bf16 autocast (tensor cores);
    depth cut to 4 blocks to bound memory (the blocks are identical in structure)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 means float32 (see test_patch.py)
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0, depth=4).cuda()
    size = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size, device="cuda")
    peer_check(model, x, 1e-4, 1e-3, train=True)
    patched = vitfast.patch(copy.deepcopy(model))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model(x), patched(x)
    assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 3e-2


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("name", ["cait_xxs24_224", "cait_s24_384"])
def test_sdpa_route_is_a_peer_on_gpu(name, monkeypatch):
    """head_mix_impl="sdpa" at native resolution: float32 and bf16 autocast (SDPA's fused backends)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = timm.create_model(name, drop_path_rate=0.0, depth=4).cuda()
    size = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size, device="cuda")
    peer_check(model, x, 1e-4, 1e-3, train=True, head_mix_impl="sdpa")
    patched = vitfast.patch(copy.deepcopy(model), head_mix_impl="sdpa")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model(x), patched(x)
    assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 3e-2
