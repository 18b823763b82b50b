"""Measurements and plots for the low-rank report: parameters, MACs, throughput, KL to the
original, accuracy; the paper's Fig. 1 (dims for 90% energy) and the chosen ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.measure import count_macs, count_params, throughput  # noqa: F401  (re-exported)
from .stats import batches


@torch.no_grad()
def logits_of(model, images, batch_size, device, amp) -> torch.Tensor:
    model.eval()
    out = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        for xb in batches(images, batch_size):
            out.append(model(xb.to(device)).float().cpu())
    return torch.cat(out)


def evaluate(model, images, labels, reference_logits, batch_size, device, amp=True) -> dict:
    logits = logits_of(model, images, batch_size, device, amp)
    res = {"kl_to_original": F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference_logits, -1), log_target=True,
                                      reduction="batchmean").item()}
    if labels is not None:
        res["accuracy"] = (logits.argmax(-1) == labels).float().mean().item()
    return res


def plot_energy_and_ranks(rows: list[dict], path: str) -> str:
    """rows: per layer {name, out_dims90, in_dims90, weight_dims90, full_out, rank or None}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(rows)), 8), sharex=True)
    ax = axes[0]
    frac = lambda key, full: [r[key] / r[full] * 100 for r in rows]  # noqa: E731
    ax.plot(x, frac("in_dims90", "full_in"), "o-", label="input features")
    ax.plot(x, frac("out_dims90", "full_out"), "s-", label="output features")
    ax.plot(x, frac("weight_dims90", "full_min"), "^-", label="weights (singular values)")
    ax.set_ylabel("% of dims for 90% energy")
    ax.set_title("Output features are low-rank; weights are not (the paper's Fig. 1)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.bar(x, [r["full_out"] for r in rows], color="#ddd", label="full (output dim)")
    ax.bar(x, [r["rank"] or r["full_out"] for r in rows], color="#3a7", label="kept rank (AAFM)")
    ax.set_ylabel("dims")
    ax.legend()
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
