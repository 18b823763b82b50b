"""Training state as ONE safetensors file, written atomically: model weights, EMA weights,
optimizer tensors, RNG states, and (in the metadata) the optimizer's hyper-parameters, the
scheduler, the epoch and the run's history. A run killed at any instant resumes from a state whose
parts all belong to the same epoch: there is no second file to disagree with."""
from __future__ import annotations

import json
import os

import torch

from ..errors import UserError

FORMAT = "vitfast-train/1"


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""


def atomic_write(path: str, write) -> None:
    """write(tmp_path), fsync, rename over path: readers see the old file or the new, never half."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
    atomic_write(path, w)


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict copies safe for safetensors (no shared storage, contiguous, on the CPU)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _split_optimizer(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = val.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{pid}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, val in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    for name, val in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(path: str, *, model: torch.nn.Module, epoch: int, optimizer=None, scheduler=None,
                        ema: torch.nn.Module | None = None, scaler=None, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in state_tensors(model).items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in state_tensors(ema).items()})
    meta = {"format": FORMAT, "epoch": epoch, "extra": extra or {}}
    if optimizer is not None:
        t, m = _split_optimizer(optimizer)
        tensors.update(t)
        meta["optimizer"] = m
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = scaler.state_dict()
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    text = json.dumps(meta, default=float)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"vitfast": text}))


def read_training_meta(path: str) -> dict:
    """A training checkpoint's metadata (epoch, extra) without reading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("vitfast")
    except Exception as exc:  # a torn or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({exc}); delete it to start fresh") from exc
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a vitfast training checkpoint (format {meta.get('format')!r})")
    return meta


def load_training_state(path: str, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                        ema: torch.nn.Module | None = None, scaler=None, device="cpu") -> dict:
    """Restores what was saved into the given objects; returns the metadata (epoch, extra)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("vitfast")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a torn or foreign file
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({exc}); delete it to start fresh") from exc
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a vitfast training checkpoint (format {meta.get('format')!r})")
    model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    describe_mismatch(model, model_sd, path)
    model.load_state_dict(model_sd)
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    if optimizer is not None and "optimizer" in meta:
        optimizer.load_state_dict(_join_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")},
                                                  meta["optimizer"]))
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and "scaler" in meta:
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


def describe_mismatch(model: torch.nn.Module, state: dict, source: str, limit: int = 4) -> None:
    """Raises a short CheckpointError (a few lines, not 100) when `state` does not fit `model`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    lines = [f"weights in '{source}' do not fit the model ({type(model).__name__}):"]
    if shapes:
        lines.append(f"  {len(shapes)} shape(s) differ, e.g. " + "; ".join(
            f"{k}: file {a} vs model {b}" for k, a, b in shapes[:limit]))
    if missing:
        lines.append(f"  {len(missing)} key(s) missing from the file, e.g. {', '.join(missing[:limit])}")
    if unexpected:
        lines.append(f"  {len(unexpected)} key(s) the model lacks, e.g. {', '.join(unexpected[:limit])}")
    raise CheckpointError("\n".join(lines))


def read_saved_model(path: str, fmt: str, kind: str) -> tuple[dict, dict]:
    """(structure.json, weights) of a saved model folder (a Mini model, a compressed model: its
    structure plus model.safetensors); `path` may also name either file. Whatever is missing or
    unreadable is a UserError naming the file; `kind` says what the folder should hold."""
    from safetensors.torch import load_file

    if os.path.isfile(path) and os.path.basename(path) in ("structure.json", "model.safetensors"):
        path = os.path.dirname(path) or "."  # a file of the saved model: its folder
    spec_path, weights = os.path.join(path, "structure.json"), os.path.join(path, "model.safetensors")
    if not os.path.exists(spec_path):
        raise UserError(f"'{path}' holds no structure.json: not a saved {kind}")
    if not os.path.exists(weights):
        raise UserError(f"'{path}' holds structure.json but no model.safetensors: the weights of the saved {kind} "
                        "are missing")
    try:
        with open(spec_path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"'{spec_path}' cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(spec, dict) or spec.get("format") != fmt:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise UserError(f"'{path}' is not a {fmt} model (format {got!r})")
    try:
        state = load_file(weights)
    except Exception as exc:  # truncated, or not a safetensors file
        raise UserError(f"'{weights}' cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    return spec, state
