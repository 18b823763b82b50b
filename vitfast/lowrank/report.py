"""Measurements and plots for the low-rank report: parameters, MACs, throughput, KL to the
original, accuracy; the paper's Fig. 1 (dims for 90% energy) and the chosen ranks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.measure import count_macs, count_params, throughput  # noqa: F401  (re-exported)
from ..engine.trainer import autocast_for
from .stats import batches, to_device
from .tokens import select_tokens


def input_batches(inputs, batch_size):
    """Batches of model inputs: from a tensor / dict of tensors, or from a streamed evaluation set
    (a zero-argument function giving (inputs, labels) batches, e.g. an ImageFolder DataLoader)."""
    if callable(inputs):
        return (xb for xb, _ in inputs())
    return batches(inputs, batch_size)


def labels_of(inputs, labels):
    """The labels of an evaluation set: given, or streamed with the inputs."""
    if labels is not None or not callable(inputs):
        return labels
    return torch.cat([yb for _, yb in inputs()])


@torch.no_grad()
def outputs_of(model, inputs, batch_size, device, amp, output_fn, mask_fn=None) -> list:
    """[(output, mask)] per batch, on the CPU in float32 (inputs: see `input_batches`)."""
    model.eval()
    out = []
    with autocast_for(device, amp):
        for xb in input_batches(inputs, batch_size):
            xb = to_device(xb, device)
            mask = mask_fn(xb) if mask_fn is not None else None
            out.append((output_fn(model, xb).float().cpu(), None if mask is None else mask.cpu()))
    return out


def logits_of(model, images, batch_size, device, amp) -> torch.Tensor:
    from .outputs import _logits

    return torch.cat([o for o, _ in outputs_of(model, images, batch_size, device, amp, _logits)])


def evaluate(model, inputs, labels, reference, batch_size, device, amp=True, output_fn=None, is_logits=True,
             mask_fn=None) -> dict:
    """Against the original's outputs `reference` (from `outputs_of`): KL and accuracy for logits;
    relative squared error and mean cosine similarity (over the tokens that count) otherwise."""
    from .outputs import _logits

    cur = outputs_of(model, inputs, batch_size, device, amp, output_fn or _logits, mask_fn)
    if is_logits:
        logits, ref = torch.cat([o for o, _ in cur]), torch.cat([o for o, _ in reference])
        res = {"kl_to_original": F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                                          reduction="batchmean").item()}
        if labels is not None:
            res["accuracy"] = (logits.argmax(-1) == labels).float().mean().item()
        return res
    c = torch.cat([select_tokens(o, m, "the output") for o, m in cur])
    r = torch.cat([select_tokens(o, m, "the output") for o, m in reference])
    return {"rel_error_to_original": ((c - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-30)).item(),
            "cosine_to_original": F.cosine_similarity(c.double(), r.double(), dim=-1).mean().item()}


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
