"""GFM: fine-tune the compressed model to reproduce the original's final features (after the final
norm, before the head; head frozen) on the unlabeled proxy set: MSE, on vitfast.engine (AdamW +
warm-up/cosine, AMP on CUDA, DDP under torchrun, one atomic checkpoint per epoch and resume)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import rank_world
from .stats import batches


def final_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Features after the final norm, before pooling and the head (timm `forward_features`;
    Hugging Face encoders: `last_hidden_state`)."""
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    out = model(x)
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise TypeError("GFM needs a model with forward_features (timm) or an output with last_hidden_state")


class FeatureModel(nn.Module):
    """forward = final_features, so that DDP (which hooks forward) sees the GFM path."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return final_features(self.model, x)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    if hasattr(model, "get_classifier"):
        return list(model.get_classifier().parameters())
    return []


@torch.no_grad()
def teacher_features(teacher: nn.Module, images: torch.Tensor, batch_size: int, device, amp: bool) -> torch.Tensor:
    teacher.eval()
    out = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for xb in batches(images, batch_size):
            out.append(final_features(teacher, xb.to(device)).float())
    return torch.cat(out)


def gfm_finetune(student: nn.Module, teacher: nn.Module, images: torch.Tensor, epochs: int = 30, lr: float = 5e-4,
                 batch_size: int = 64, weight_decay: float = 0.01, warmup_epochs: int = 1, device="cpu",
                 amp: bool = True, checkpoint_dir: str | None = None, seed: int = 0, progress: bool = True,
                 log=print) -> list[float]:
    """Returns the mean loss of each epoch. Training machinery (schedule, AMP, clipping, DDP,
    one atomic checkpoint per epoch in checkpoint_dir and resume) is vitfast.engine.fit."""
    from ..engine import TrainConfig, fit

    device = torch.device(device)
    rank, world = rank_world()
    student.to(device)
    target = teacher_features(teacher, images, batch_size, device, amp and device.type == "cuda")
    for p in head_parameters(student):
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    # the few-shot set (2,000 images: 1.2 GB in fp32 at 224) moves to the GPU once when it fits
    # easily, so steps gather batches there instead of copying pageable host slices every step
    source = images
    if device.type == "cuda" and images.numel() * images.element_size() < 0.25 * torch.cuda.mem_get_info(device)[0]:
        source = images.to(device)

    def batches(epoch):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))[rank::world]
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]

    def loss_fn(model, idx):
        xb = source[idx.to(source.device)].to(device, non_blocking=True)
        feats = model(xb)
        return F.mse_loss(feats.float(), target[idx.to(target.device)]), len(idx), {}

    cfg = TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, clip_grad=5.0,
                      amp_dtype="bfloat16" if amp else "float32", seed=seed)
    steps = math.ceil(math.ceil(len(images) / world) / batch_size)
    result = fit(FeatureModel(student), cfg, batches=batches, steps_per_epoch=steps, loss_fn=loss_fn, device=device,
                 out_dir=checkpoint_dir, params=params, log=log, progress=progress, desc="GFM")
    student.eval()
    return [h["train_loss"] for h in result.history]
