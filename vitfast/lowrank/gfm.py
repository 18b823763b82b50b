"""GFM: fine-tune the compressed model to reproduce the original's final features (after the final
norm, before the head; head frozen) on the unlabeled proxy set. MSE, AdamW + cosine, AMP on CUDA,
DDP under torchrun, checkpoint every epoch and resume."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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
    """Returns the mean loss of each epoch run. With checkpoint_dir, state is saved after every
    epoch (model weights in safetensors, optimiser state beside) and a later call resumes."""
    from safetensors.torch import load_file, save_file

    device = torch.device(device)
    use_amp = amp and device.type == "cuda"
    rank, world = rank_world()
    student.to(device)
    target = teacher_features(teacher, images, batch_size, device, use_amp)
    for p in head_parameters(student):
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(images) / world) / batch_size)
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(warm, 1) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1))))
    start_epoch, history = 0, []
    state_path = os.path.join(checkpoint_dir, "gfm_state.pt") if checkpoint_dir else None
    weights_path = os.path.join(checkpoint_dir, "gfm_model.safetensors") if checkpoint_dir else None
    if state_path and os.path.exists(state_path) and os.path.exists(weights_path):
        student.load_state_dict(load_file(weights_path, device=str(device)))
        state = torch.load(state_path, map_location=device, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"], state["history"]
        if rank == 0:
            log(f"GFM: resuming after epoch {start_epoch}/{epochs}")
    model = FeatureModel(student)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    # the few-shot set (2,000 images: 1.2 GB in fp32 at 224) moves to the GPU once when it fits
    # easily, so steps gather batches there instead of copying pageable host slices every step
    source = images
    if device.type == "cuda" and images.numel() * images.element_size() < 0.25 * torch.cuda.mem_get_info(device)[0]:
        source = images.to(device)
    bar = tqdm(range(start_epoch, epochs), desc="GFM", disable=not progress or rank != 0, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed + epoch))[rank::world]
        running, count = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            xb = source[idx.to(source.device)].to(device, non_blocking=True)
            tb = target[idx.to(target.device)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                feats = model(xb)
            loss = F.mse_loss(feats.float(), tb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            running += loss.detach() * len(idx)
            count += len(idx)
        history.append(running.item() / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4g}")
        if state_path and rank == 0:
            os.makedirs(checkpoint_dir, exist_ok=True)
            tmp_w, tmp_s = weights_path + ".tmp", state_path + ".tmp"
            save_file({k: v.contiguous() for k, v in student.state_dict().items()}, tmp_w)
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                        "history": history}, tmp_s)
            os.replace(tmp_w, weights_path)  # complete files only: a crash mid-save loses one epoch at most
            os.replace(tmp_s, state_path)
    student.eval()
    return history


