"""AAFM: how sensitive is each layer to AFM at each rank, and which ranks to keep under a
parameter budget (greedy)."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..progress import progress as progress_bar
from .layers import LowRankLinear, get_module, set_module


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


def sensitivities(model: nn.Module, runner, layers: dict[str, nn.Linear], bases: dict, means: dict,
                  rank_step: int, progress: bool = True) -> list[LayerChoice]:
    """S_i(k) = distance(original output, output with only layer i replaced by AFM at rank k):
    KL for logits, relative squared error otherwise (`block_cache.SearchRunner`)."""
    choices = []
    bar = progress_bar(total=sum(len(candidate_ranks(lin, rank_step)) for lin in layers.values()),
                       desc="AAFM sensitivity", enabled=progress, leave=False)
    for name, lin in layers.items():
        full = lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
        c = LayerChoice(name, lin.in_features, lin.out_features, full, candidate_ranks(lin, rank_step))
        if c.ranks:
            c.sensitivity = runner.rank_distances(name, lin, bases[name], means[name], c.ranks)
        bar.update(len(c.ranks))
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
