"""Which tokens count. Padding (or dropped tokens) must never enter a layer's statistics, the
sensitivity distances or the GFM loss: every batch gets a (batch, tokens) bool mask.

A mask spec is "auto" (a dict input's `attention_mask`, else every token), None (every token) or
a function batch -> (batch, tokens) bool tensor (or None) for other models."""
from __future__ import annotations

from typing import Callable

import torch

MaskFn = Callable[[object], "torch.Tensor | None"]


def auto_mask(batch) -> torch.Tensor | None:
    if isinstance(batch, dict) and torch.is_tensor(batch.get("attention_mask")):
        return batch["attention_mask"] != 0
    return None


def resolve_token_mask(spec) -> MaskFn:
    if spec is None or spec == "none":
        return lambda batch: None
    if spec == "auto":
        return auto_mask
    if callable(spec):
        def checked(batch):
            mask = spec(batch)
            if mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2):
                raise ValueError(f"lowrank: the token mask function must return a (batch, tokens) tensor or None, got "
                                 f"{type(mask).__name__} {getattr(mask, 'shape', '')}")
            return None if mask is None else mask.bool()
        return checked
    raise ValueError(f"lowrank: argument 'token_mask' must be 'auto', None or a function batch -> (batch, tokens) "
                     f"bool mask, got {spec!r}")


def select_tokens(t: torch.Tensor, mask: torch.Tensor | None, where: str) -> torch.Tensor:
    """The rows of t that count, as (rows, features): (B, N, ..., C) under a (B, N) mask keeps the
    masked-in tokens; per-sample features (B, C) (a pooler's) are kept whole; without a mask every
    row counts."""
    if mask is None:
        return t.reshape(-1, t.shape[-1])
    if t.dim() == 2 and t.shape[0] == mask.shape[0]:
        return t
    if t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask.to(t.device)].reshape(-1, t.shape[-1])
    raise ValueError(f"lowrank: the token mask {list(mask.shape)} (batch, tokens) does not fit {where}'s output "
                     f"{list(t.shape)}; give a token_mask function whose mask matches every layer's tokens, or "
                     "token_mask=None to count every token")
