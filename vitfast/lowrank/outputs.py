"""What the compressed model must reproduce. An output spec names what the AAFM sensitivity
compares and what GFM fine-tunes towards:

    "logits"  the classifier output (timm models; Hugging Face `.logits`)
    "tokens"  the final token states (timm `forward_features`, after the final norm; Hugging Face
              `last_hidden_state`)
    "pooled"  one vector per sample (timm `forward_head(..., pre_logits=True)`; Hugging Face
              `pooler_output`, else the masked mean of `last_hidden_state`)
    "auto"    logits when the model has them, else token states (sensitivity); token states (GFM)
    a function (model, batch) -> tensor, for anything else.

Logits are compared by KL divergence, everything else by relative squared error (over the tokens
that count, for token states)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .stats import call
from .tokens import auto_mask

OutputFn = Callable[[nn.Module, object], torch.Tensor]
SPECS = ("auto", "logits", "tokens", "pooled")


def model_output(out) -> torch.Tensor:
    """Logits of a classifier output, or the final hidden states of an encoder's."""
    if torch.is_tensor(out):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    raise TypeError(f"cannot read logits or hidden states from a {type(out).__name__}")


def _logits(model, batch):
    out = call(model, batch)
    if torch.is_tensor(out):
        return out
    if getattr(out, "logits", None) is None:
        raise TypeError(f"lowrank: output 'logits': the model's {type(out).__name__} has no logits")
    return out.logits


def _tokens(model, batch):
    if hasattr(model, "forward_features") and torch.is_tensor(batch):
        return model.forward_features(batch)
    out = call(model, batch)
    if getattr(out, "last_hidden_state", None) is None:
        raise TypeError(f"lowrank: output 'tokens': the model has no forward_features and its {type(out).__name__} "
                        "no last_hidden_state; pass a function (model, batch) -> tensor")
    return out.last_hidden_state


def _pooled(model, batch):
    if hasattr(model, "forward_head") and hasattr(model, "forward_features") and torch.is_tensor(batch):
        return model.forward_head(model.forward_features(batch), pre_logits=True)
    out = call(model, batch)
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise TypeError("lowrank: output 'pooled': no pooler_output or last_hidden_state; pass a function")
    mask = auto_mask(batch)
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def has_logits(model: nn.Module, example_batch) -> bool:
    with torch.no_grad():
        out = call(model, example_batch)
    return torch.is_tensor(out) or getattr(out, "logits", None) is not None


def resolve_output(spec, model: nn.Module, example_batch, for_gfm: bool = False) -> tuple[OutputFn, bool]:
    """(function (model, batch) -> tensor, whether it gives logits)."""
    if callable(spec):
        return spec, False
    if spec not in SPECS:
        raise ValueError(f"lowrank: an output must be one of {SPECS} or a function (model, batch) -> tensor, "
                         f"got {spec!r}")
    if spec == "auto":
        spec = "tokens" if for_gfm or not has_logits(model, example_batch) else "logits"
    return {"logits": _logits, "tokens": _tokens, "pooled": _pooled}[spec], spec == "logits"
