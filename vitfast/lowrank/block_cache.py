"""The AAFM search re-runs the model once per (layer, candidate rank). Two savings make that
cheap for any model whose repeated blocks can be located (timm ViT/DeiT/Swin, Hugging Face
encoder layers, or a list the user gives):

* block replay: the outputs of every block are recorded once; a change inside block j re-runs
  the model with blocks 0..j-1 replaced by their recorded outputs, so only blocks j.. compute;
* several ranks per forward: AFM at rank k is the projection of the layer's output onto the
  first k eigenvectors, a prefix of one basis. The batch is replicated R times, the layer's
  output is projected once onto the largest candidate's basis, and replica r keeps its first k_r
  coefficients; the R candidates then run through the rest of the model as one batch.

Both are exact: a candidate's output equals the model with that layer replaced by its rank-k
LowRankLinear (up to floating-point rounding)."""
from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.trainer import amp_name, autocast_for
from .stats import batches, num_samples, to_device
from .tokens import MaskFn, select_tokens


def find_blocks(model: nn.Module, blocks=None) -> list[tuple[str, nn.Module]]:
    """(name, module) of the model's repeated blocks: `blocks` (modules or names) if given, else
    the children of every ModuleList/Sequential whose 2+ children share one class and hold
    linear layers, innermost first (Swin: the blocks inside each stage, not the stages)."""
    names = {id(m): n for n, m in model.named_modules()}
    if blocks is not None:
        out = []
        for b in blocks:
            mod = model.get_submodule(b) if isinstance(b, str) else b
            if id(mod) not in names:
                raise ValueError(f"lowrank: argument 'blocks': {b!r} is not a submodule of the model")
            out.append((names[id(mod)], mod))
        return out
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 2:
            kids = list(mod.children())
            if len({type(k) for k in kids}) == 1 and any(isinstance(m, nn.Linear) for m in kids[0].modules()):
                found.append((name, kids))
    inner = [(n, kids) for n, kids in found
             if not any(o != n and o.startswith(n + ".") for o, _ in found)]  # no repeated blocks inside
    return [(names[id(k)], k) for _, kids in inner for k in kids]


def _replicate(obj, r: int, batch: int):
    """obj with every tensor whose first dim is `batch` repeated r times along it."""
    if torch.is_tensor(obj):
        return obj.repeat(r, *([1] * (obj.dim() - 1))) if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_replicate(v, r, batch) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_replicate(v, r, batch) for v in obj)
    if isinstance(obj, dict):
        return type(obj)(**{k: _replicate(v, r, batch) for k, v in obj.items()})
    return obj


def output_distance(cur: torch.Tensor, ref: torch.Tensor, is_logits: bool, mask) -> torch.Tensor:
    """Summed over the batch: KL(ref || cur) for logits, else the batch's relative squared error
    (over the tokens that count) times its size."""
    cur, ref = cur.float(), ref.float()
    if is_logits:
        return F.kl_div(F.log_softmax(cur, -1), F.log_softmax(ref, -1), log_target=True, reduction="sum").double()
    c, r = select_tokens(cur, mask, "the output"), select_tokens(ref, mask, "the output")
    return ((c - r).pow(2).sum() / r.pow(2).sum().clamp_min(1e-30)).double() * ref.shape[0]


class SearchRunner:
    """Runs the model over the proxy set for the sensitivity search (see the module docstring)."""

    def __init__(self, model: nn.Module, inputs, batch_size: int, device, amp, output_fn, is_logits: bool,
                 mask_fn: MaskFn, blocks=None, search_batch: int = 256):
        self.model, self.inputs, self.batch_size = model, inputs, batch_size
        self.device = torch.device(device)
        self.amp = amp_name(amp)  # a dtype name, or a bool (True: bfloat16)
        self.output_fn, self.is_logits, self.mask_fn = output_fn, is_logits, mask_fn
        self.replicas = max(1, search_batch // batch_size)
        self.blocks = find_blocks(model, blocks)
        self.batches = [to_device(xb, self.device) for xb in batches(inputs, batch_size)]
        self.masks = [mask_fn(xb) for xb in self.batches]
        self.cache: list[list] = [[] for _ in self.blocks]
        calls = [0] * len(self.blocks)

        def record(j):
            def hook(mod, args, out):
                calls[j] += 1
                self.cache[j].append(out)
            return hook

        handles = [b.register_forward_hook(record(j)) for j, (_, b) in enumerate(self.blocks)]
        try:
            self.reference = self._outputs(lambda b: None)  # records every block's output
        finally:
            for h in handles:
                h.remove()
        if any(c != len(self.batches) for c in calls):  # a block called twice per forward (or never)
            self.blocks, self.cache = [], []
        self.blockwise = bool(self.blocks)

    def block_of(self, layer_name: str) -> int | None:
        for j, (name, _) in enumerate(self.blocks):
            if layer_name.startswith(name + "."):
                return j
        return None

    @torch.no_grad()
    def _outputs(self, before_batch) -> list[torch.Tensor]:
        self.model.eval()
        out = []
        with autocast_for(self.device, self.amp):
            for i, xb in enumerate(self.batches):
                before_batch(i)
                out.append(self.output_fn(self.model, xb))
        return out

    @contextlib.contextmanager
    def _replayed(self, upto: int, replicas: int, batch_index: list):
        """Blocks 0..upto-1 return their recorded outputs (replicated) instead of computing."""
        mods = [b for _, b in self.blocks[:upto]]

        def fixed(j):
            def forward(*args, **kwargs):
                i = batch_index[0]
                return _replicate(self.cache[j][i], replicas, num_samples(self.batches[i]))
            return forward

        for j, m in enumerate(mods):
            m.forward = fixed(j)  # instance attribute: nn.Module.__call__ finds it first
        try:
            yield
        finally:
            for m in mods:
                del m.forward

    @torch.no_grad()
    def rank_distances(self, layer_name: str, layer: nn.Module, basis: torch.Tensor, mean: torch.Tensor,
                       ranks: list[int]) -> dict[int, float]:
        """Mean distance to the original output with only `layer` at AFM rank k, for every k."""
        start = self.block_of(layer_name) if self.blockwise else None
        upto = start or 0
        totals = {}
        for g in range(0, len(ranks), self.replicas):
            group = ranks[g:g + self.replicas]
            totals.update(self._group(layer, basis, mean, group, upto))
        n = num_samples(self.inputs)
        return {r: float(t) / n for r, t in totals.items()}

    def _group(self, layer, basis, mean, group, upto) -> dict[int, torch.Tensor]:
        reps, kmax = len(group), max(group)
        batch_index = [0]
        u = basis[:, :kmax]

        def project(mod, args, out):
            # one projection onto the largest candidate's basis per replica (replicas differ when a
            # layer runs more than once per forward); replica r keeps its first k_r coefficients
            b = out.shape[0] // reps
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            mu = mean.to(out.device, acc)
            uu = u.to(out.device, acc)
            parts = []
            for r, k in enumerate(group):
                coef = (out[r * b:(r + 1) * b].to(acc) - mu) @ uu[:, :k]
                parts.append((mu + coef @ uu[:, :k].T).to(out.dtype))
            return torch.cat(parts, 0)

        totals = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in group}
        handle = layer.register_forward_hook(project)
        try:
            with self._replayed(upto, reps, batch_index), \
                    autocast_for(self.device, self.amp):
                self.model.eval()
                for i, xb in enumerate(self.batches):
                    batch_index[0] = i
                    out = self.output_fn(self.model, _replicate(xb, reps, num_samples(xb)))
                    b = num_samples(xb)
                    for r, k in enumerate(group):  # device sums: one sync per layer, not per batch
                        totals[k] = totals[k] + output_distance(out[r * b:(r + 1) * b], self.reference[i],
                                                                self.is_logits, self.masks[i])
        finally:
            handle.remove()
        return totals


def block_index(name: str) -> int | None:
    """timm-style `blocks.N.` index of a layer name (for reports)."""
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) if m else None
