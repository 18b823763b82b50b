"""AAFM: how sensitive is each layer to AFM at each rank, and which ranks to keep under a
parameter budget (greedy)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .layers import LowRankLinear, get_module, set_module
from .stats import batches, call, to_device


@dataclass
class LayerChoice:
    name: str
    in_features: int
    out_features: int
    full_params: int
    ranks: list[int] = field(default_factory=list)         # candidates, ascending
    sensitivity: dict[int, float] = field(default_factory=dict)  # rank -> mean KL


def candidate_ranks(lin: nn.Linear, step: int) -> list[int]:
    """Multiples of `step` whose two-layer form has fewer parameters than the layer itself."""
    full = lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
    out, r = [], step
    while r < min(lin.in_features, lin.out_features) and \
            LowRankLinear.params_for(lin.in_features, lin.out_features, r, lin.bias is not None) < full:
        out.append(r)
        r += step
    return out


def model_output(out):
    """Logits of a classifier output, or the final hidden states of an encoder's."""
    if torch.is_tensor(out):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    raise TypeError(f"cannot read logits or hidden states from a {type(out).__name__}")


class LogitRunner:
    """Logits of the model over the proxy set, recomputing only what a change can affect.

    For timm ViT-style models (`blocks`, `norm`, `forward_head`), the input of every block is
    cached once; a change inside block j re-runs blocks j.. only. Other models run whole."""

    def __init__(self, model: nn.Module, images: torch.Tensor, batch_size: int, device, amp: bool):
        self.model, self.images, self.batch_size, self.device = model, images, batch_size, torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        blocks = getattr(model, "blocks", None)
        self.blockwise = isinstance(blocks, (nn.Sequential, nn.ModuleList)) and hasattr(model, "forward_head") \
            and hasattr(model, "norm")
        self.cache: list[list[torch.Tensor]] = []
        self.has_logits = True
        if self.blockwise:
            self.cache = [[] for _ in blocks]
            handles = [b.register_forward_pre_hook(lambda m, a, j=j: self.cache[j].append(a[0].detach()))
                       for j, b in enumerate(blocks)]
            try:
                self.reference = self.logits(None)
            finally:
                for h in handles:
                    h.remove()
        else:
            self.reference = self.logits(None)
            with torch.no_grad():
                probe = call(model, to_device(next(batches(images, 1)), self.device))
            self.has_logits = torch.is_tensor(probe) or getattr(probe, "logits", None) is not None

    def block_of(self, layer_name: str) -> int | None:
        m = re.match(r"blocks\.(\d+)\.", layer_name)
        return int(m.group(1)) if (self.blockwise and m) else None

    @torch.no_grad()
    def logits(self, start_block: int | None) -> list[torch.Tensor]:
        self.model.eval()
        out = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if start_block is None or not self.cache or not self.cache[0]:
                for xb in batches(self.images, self.batch_size):
                    out.append(model_output(call(self.model, to_device(xb, self.device))).float())
            else:
                for x in self.cache[start_block]:
                    for blk in self.model.blocks[start_block:]:
                        x = blk(x)
                    out.append(self.model.forward_head(self.model.norm(x)).float())
        return out

    def kl_to_reference(self, start_block: int | None) -> float:
        """Mean over the proxy set of KL(original || current) for classifiers; for encoders
        without logits, the relative squared error of the final hidden states."""
        total, n = 0.0, 0  # a device tensor after the first batch: one sync per call, not per batch
        for ref, cur in zip(self.reference, self.logits(start_block)):
            if self.has_logits:
                total = total + F.kl_div(F.log_softmax(cur, -1), F.log_softmax(ref, -1), log_target=True,
                                             reduction="sum").double()
            else:
                total = total + ((cur - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)).double() * ref.shape[0]
            n += ref.shape[0]
        return float(total) / n


def sensitivities(model: nn.Module, runner: LogitRunner, layers: dict[str, nn.Linear], bases: dict, means: dict,
                  rank_step: int, progress: bool = True) -> list[LayerChoice]:
    """S_i(k) = KL(original || original with only layer i replaced by AFM at rank k)."""
    choices = []
    todo = [(n, lin) for n, lin in layers.items()]
    bar = tqdm(total=sum(len(candidate_ranks(lin, rank_step)) for _, lin in todo), desc="AAFM sensitivity",
               disable=not progress, leave=False)
    for name, lin in todo:
        full = lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
        c = LayerChoice(name, lin.in_features, lin.out_features, full, candidate_ranks(lin, rank_step))
        start = runner.block_of(name)
        for r in c.ranks:
            set_module(model, name, LowRankLinear.from_afm(lin, bases[name][:, :r], means[name]))
            try:
                c.sensitivity[r] = runner.kl_to_reference(start)
            finally:
                set_module(model, name, lin)
            bar.update(1)
        choices.append(c)
    bar.close()
    return choices


def greedy_allocation(choices: list[LayerChoice], other_params: int, target_params: int) -> dict[str, int]:
    """Ranks minimising the summed sensitivity with total parameters <= target (greedy on the
    sensitivity added per parameter removed). Layers absent from the result stay full."""
    options = {}
    for c in choices:  # per layer: (params, sensitivity, rank or None), from full downwards
        opts = [(c.full_params, 0.0, None)]
        for r in sorted(c.ranks, reverse=True):
            opts.append((LowRankLinear.params_for(c.in_features, c.out_features, r), c.sensitivity[r], r))
        options[c.name] = opts
    pos = {name: 0 for name in options}
    total = other_params + sum(o[0][0] for o in options.values())
    floor = other_params + sum(o[-1][0] for o in options.values())
    if target_params < floor:
        raise ValueError(f"target of {target_params:,} parameters is impossible: even the smallest ranks leave "
                         f"{floor:,} (of {total:,})")
    while total > target_params:
        best, best_cost = None, None
        for name, opts in options.items():
            i = pos[name]
            if i + 1 < len(opts):
                saved = opts[i][0] - opts[i + 1][0]
                cost = (opts[i + 1][1] - opts[i][1]) / saved
                if best_cost is None or cost < best_cost:
                    best, best_cost = name, cost
        total -= options[best][pos[best]][0] - options[best][pos[best] + 1][0]
        pos[best] += 1
    return {name: options[name][i][2] for name, i in pos.items() if options[name][i][2] is not None}


def apply_structure(model: nn.Module, ranks: dict[str, int], method: str, bases=None, means=None) -> nn.Module:
    """Replace each named linear by its rank-k LowRankLinear, in place ("afm" or "svd")."""
    for name, r in ranks.items():
        lin = get_module(model, name)
        if method == "afm":
            new = LowRankLinear.from_afm(lin, bases[name][:, :r], means[name])
        elif method == "svd":
            new = LowRankLinear.from_svd(lin, r)
        else:
            raise ValueError(f"apply_structure: argument 'method' must be 'afm' or 'svd', got {method!r}")
        set_module(model, name, new)
    return model
