"""One pass over the proxy set gathers the statistics of every linear layer's outputs (and,
optionally, inputs) through forward hooks into float64 streaming covariances."""
from __future__ import annotations


import torch
from torch import nn

from ..engine.trainer import autocast_for
from ..progress import progress as progress_bar
from ..ops import CovarianceAccumulator


# Inputs are a tensor (images) or a dict of tensors (e.g. a tokenizer's input_ids/attention_mask),
# batch dimension first.


def num_samples(inputs) -> int:
    return inputs.shape[0] if torch.is_tensor(inputs) else next(iter(inputs.values())).shape[0]


def take(inputs, index):
    return inputs[index] if torch.is_tensor(inputs) else {k: v[index] for k, v in inputs.items()}


def to_device(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def call(model: nn.Module, batch):
    return model(batch) if torch.is_tensor(batch) else model(**batch)


def batches(inputs, batch_size: int):
    for i in range(0, num_samples(inputs), batch_size):
        yield take(inputs, slice(i, i + batch_size))


def _groups(layers: dict[str, nn.Linear], with_inputs: bool, budget_bytes: int | None) -> list[list[str]]:
    """Split layers into passes so that each pass's float64 statistics fit the memory budget."""
    if budget_bytes is None:
        return [list(layers)]
    groups, cur, used = [], [], 0
    for name, lin in layers.items():
        need = 8 * (lin.out_features ** 2 + (lin.in_features ** 2 if with_inputs else 0))
        if need > budget_bytes:
            raise ValueError(f"collect: layer '{name}' alone needs {need / 2**20:.1f} MiB of statistics, over the "
                             f"memory budget of {budget_bytes / 2**20:.1f} MiB")
        if cur and used + need > budget_bytes:
            groups.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += need
    if cur:
        groups.append(cur)
    return groups


def _stat_dtype(y: torch.Tensor) -> torch.Tensor:
    """float32 for the kernels, except a float64 model on the CPU, whose statistics stay float64."""
    return y if (y.dtype == torch.float64 and y.device.type == "cpu") else y.float()


@torch.no_grad()
def collect_linear_stats(model: nn.Module, images, layers: dict[str, nn.Linear], batch_size: int = 128,
                         device=None, with_inputs: bool = False, memory_budget_mb: float | None = None,
                         amp: bool = True, progress: bool = True, token_mask="auto"):
    """Returns ({name: output CovarianceAccumulator}, {name: input CovarianceAccumulator} or {}).

    One forward pass over `images` (a tensor or a dict of tensors) for all layers, unless the
    memory budget forces several. `token_mask` (see `lowrank.tokens`): only the tokens it keeps
    enter the statistics -- by default, a dict input's `attention_mask` excludes padding."""
    from .tokens import resolve_token_mask, select_tokens

    mask_fn = resolve_token_mask(token_mask)
    current = {"mask": None}
    if not layers:
        raise ValueError("collect: the model has no nn.Linear layers to compress")
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    budget = None if memory_budget_mb is None else int(memory_budget_mb * 2**20)
    outs, ins = {}, {}
    for group in _groups(layers, with_inputs, budget):
        handles = []
        for name in group:
            lin = layers[name]
            outs[name] = CovarianceAccumulator(lin.out_features, device)
            if with_inputs:
                ins[name] = CovarianceAccumulator(lin.in_features, device)

            def hook(mod, inp, out, name=name):
                mask = current["mask"]
                outs[name].update(_stat_dtype(select_tokens(out, mask, f"layer '{name}'")))
                if with_inputs:
                    ins[name].update(_stat_dtype(select_tokens(inp[0], mask, f"layer '{name}'")))

            handles.append(lin.register_forward_hook(hook))
        try:
            with autocast_for(device, amp):
                for xb in progress_bar(list(batches(images, batch_size)), desc="collect", enabled=progress, leave=False):
                    xb = to_device(xb, device)
                    current["mask"] = mask_fn(xb)
                    call(model, xb)
        finally:
            for h in handles:
                h.remove()
    for name, acc in list(outs.items()) + list(ins.items()):
        if not (torch.isfinite(acc.mean).all() and torch.isfinite(acc.m2).all()):
            raise FloatingPointError(f"collect: layer '{name}' produced NaN/inf activations on the proxy set")
    for accs in (outs, ins):
        for acc in accs.values():
            acc.all_reduce()
    return outs, ins


def pca(acc: CovarianceAccumulator, damping: float = 1e-8):
    """Eigenvalues (descending) and eigenvectors of the covariance, in float64. Damped by
    damping * mean eigenvalue; falls back to the CPU if the device eigh fails (low-rank inputs)."""
    cov = acc.covariance()
    cov = cov + damping * cov.diagonal().mean().clamp_min(1e-30) * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    try:
        vals, vecs = torch.linalg.eigh(cov)
    except RuntimeError:
        vals, vecs = torch.linalg.eigh(cov.cpu())
        vals, vecs = vals.to(cov.device), vecs.to(cov.device)
    return vals.flip(0).clamp_min(0), vecs.flip(1)


def dims_for_energy(values: torch.Tensor, fraction: float = 0.9) -> int:
    """Smallest number of leading components holding `fraction` of the total (values descending)."""
    c = values.cumsum(0)
    return int((c < fraction * c[-1]).sum().item()) + 1
