"""GFM: fine-tune the compressed model to reproduce the original's final features (by default
after the final norm, before the head; head frozen) on the unlabeled proxy set: MSE over the
tokens that count, on vitfast.engine (AdamW + warm-up/cosine, AMP on CUDA, DDP under torchrun, one
atomic checkpoint per epoch and resume). What to mimic is an output spec (`lowrank.outputs`):
token states by default, or logits, a pooled embedding, or any function (model, batch) -> tensor."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed import rank_world
from ..engine.trainer import amp_name, autocast_for
from .outputs import resolve_output
from .stats import batches, num_samples, take, to_device
from .tokens import resolve_token_mask, select_tokens


class FeatureModel(nn.Module):
    """forward = the GFM target's function, so that DDP (which hooks forward) sees the GFM path."""

    def __init__(self, model: nn.Module, feature_fn):
        super().__init__()
        self.model, self.feature_fn = model, feature_fn

    def forward(self, batch):
        return self.feature_fn(self.model, batch)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    if hasattr(model, "get_classifier"):
        return list(model.get_classifier().parameters())
    return []


@torch.no_grad()
def teacher_features(teacher: nn.Module, inputs, batch_size: int, device, amp, feature_fn) -> torch.Tensor:
    teacher.eval()
    out = []
    with autocast_for(device, amp):
        for xb in batches(inputs, batch_size):
            out.append(feature_fn(teacher, to_device(xb, device)).float())
    return torch.cat(out)


def masked_mse(feats: torch.Tensor, target: torch.Tensor, mask) -> torch.Tensor:
    f, t = select_tokens(feats.float(), mask, "the GFM target"), select_tokens(target, mask, "the GFM target")
    return (f - t).pow(2).mean()


def gfm_finetune(student: nn.Module, teacher: nn.Module, images, epochs: int = 30, lr: float = 5e-4,
                 batch_size: int = 64, weight_decay: float = 0.01, warmup_epochs: int = 1, device="cpu",
                 amp="bfloat16", checkpoint_dir: str | None = None, seed: int = 0, progress: bool = True,
                 log=print, features="auto", token_mask="auto", compile: bool = False,
                 checkpoint_every: int = 0) -> list[float]:
    """Returns the mean loss of each epoch. `images`: a tensor or a dict of tensors (batch first).
    Training machinery (schedule, AMP, clipping, DDP, one atomic checkpoint per epoch in
    checkpoint_dir and resume) is vitfast.engine.fit; checkpoint_every=N also saves every N steps
    there, and a later call resumes at that step exactly (a SIGTERM saves at the current step)."""
    from ..engine import TrainConfig, fit

    device = torch.device(device)
    rank, world = rank_world()
    student.to(device)
    n = num_samples(images)
    feature_fn, _ = resolve_output(features, teacher, to_device(take(images, slice(0, 1)), device), for_gfm=True)
    mask_fn = resolve_token_mask(token_mask)
    target = teacher_features(teacher, images, batch_size, device, amp, feature_fn)
    for p in head_parameters(student):
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    # the few-shot set (2,000 images: 1.2 GB in fp32 at 224) moves to the GPU once when it fits
    # easily, so steps gather batches there instead of copying pageable host slices every step
    source = images
    if device.type == "cuda" and torch.is_tensor(images) and \
            images.numel() * images.element_size() < 0.25 * torch.cuda.mem_get_info(device)[0]:
        source = images.to(device)

    def epoch_batches(epoch, start=0):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[rank::world]
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)][start:]

    def loss_fn(model, idx):
        src_idx = idx.to(source.device) if torch.is_tensor(source) else idx
        xb = to_device(take(source, src_idx), device)
        feats = model(xb)
        return masked_mse(feats, target[idx.to(target.device)], mask_fn(xb)), len(idx), {}

    cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, clip_grad=5.0,
                      amp_dtype=amp_name(amp), compile=compile, seed=seed, checkpoint_every=checkpoint_every)
    steps = math.ceil(math.ceil(n / world) / batch_size)
    result = fit(FeatureModel(student, feature_fn), cfg, batches=epoch_batches, steps_per_epoch=steps,
                 loss_fn=loss_fn, device=device, out_dir=checkpoint_dir, params=params, log=log, progress=progress,
                 desc="GFM")
    student.eval()
    return [h["train_loss"] for h in result.history]
