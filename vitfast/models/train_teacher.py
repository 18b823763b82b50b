"""`vitfast train-teacher`: train the embedded digits teacher reproducibly (fixed seeds,
deterministic CPU kernels) and save it as safetensors."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..data.digits import digits_splits
from .digits_vit import ASSET, vitfast_digits_vit


def random_shift(x: torch.Tensor, gen: torch.Generator, pixels: int = 1) -> torch.Tensor:
    """Translate each image by up to `pixels` (zero fill): a light augmentation for 16x16 digits."""
    n = x.shape[0]
    padded = F.pad(x, (pixels,) * 4, value=float(x.min()))
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(x.shape[-2])[None]
    cols = dx[:, None] + torch.arange(x.shape[-1])[None]
    return padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@torch.no_grad()
def accuracy(model, x, y, batch: int = 512) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def train_teacher(epochs: int = 60, lr: float = 1e-3, batch: int = 64, seed: int = 0, out: str = ASSET,
                  label_smoothing: float = 0.1, log=print) -> dict:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    tr_x, tr_y, te_x, te_y = digits_splits(seed=seed)
    model = vitfast_digits_vit()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(tr_x) / batch)
    warm = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(tr_x), generator=gen)
        for i in range(0, len(tr_x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(random_shift(tr_x[idx], gen)), tr_y[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, held-out accuracy {accuracy(model, te_x, te_y):.4f} "
                f"({time.time() - t0:.0f}s)")
    torch.use_deterministic_algorithms(False)
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, out,
              metadata={"model": "vitfast_digits_vit", "epochs": str(epochs), "seed": str(seed), "dtype": "float16"})
    # report the accuracy of what was saved (fp16 weights, loaded back in fp32)
    from .digits_vit import load_weights

    saved = load_weights(vitfast_digits_vit(), out)
    return {"held_out_accuracy": accuracy(saved, te_x, te_y), "train_accuracy": accuracy(saved, tr_x, tr_y), "out": out}
