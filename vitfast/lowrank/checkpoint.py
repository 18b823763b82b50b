"""Compressed checkpoints: weights in safetensors plus structure.json, enough to rebuild the model
from its timm name (vitfast.load_compressed)."""
from __future__ import annotations

import json
import os

from torch import nn

from .layers import LowRankLinear, get_module, set_module

FORMAT = "vitfast-lowrank/1"


def save_compressed(model: nn.Module, out_dir: str, base_model: str, ranks: dict[str, int], model_kwargs=None,
                    extra: dict | None = None) -> str:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    layers = {}
    for name, r in ranks.items():
        m = get_module(model, name)
        layers[name] = {"rank": r, "in_features": m.in_features, "out_features": m.out_features,
                        "bias": m.first.bias is not None}
    structure = {"format": FORMAT, "base_model": base_model, "model_kwargs": model_kwargs or {}, "layers": layers,
                 **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": FORMAT})
    with open(os.path.join(out_dir, "structure.json"), "w") as f:
        json.dump(structure, f, indent=2)
    return out_dir


def load_compressed(path: str, device="cpu") -> nn.Module:
    """Rebuild a model saved by `vitfast lowrank` (a folder with structure.json + model.safetensors,
    or either file's path; what is missing or unreadable is a UserError naming it)."""
    import timm

    from .. import models  # noqa: F401  (registers vitfast's own timm models)
    from ..engine.checkpoint import read_saved_model

    structure, state = read_saved_model(path, FORMAT, "compressed model")
    model = timm.create_model(structure["base_model"], pretrained=False, **structure["model_kwargs"])
    for name, spec in structure["layers"].items():
        set_module(model, name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], bias=spec["bias"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
