"""Models by timm name, with weights from a checkpoint file, and errors a user can act on: an unknown
name lists the closest names timm knows, a checkpoint that does not fit says in a few lines which
keys and shapes differ (and what --num-classes would make the head fit)."""
from __future__ import annotations

import difflib
import os

import torch
from torch import nn

from ..errors import UserError
from .checkpoint import CheckpointError, describe_mismatch


def known_model_names() -> list[str]:
    import timm

    from .. import models  # noqa: F401  (vitfast's own timm registrations)

    return timm.list_models()


def check_model_name(name: str, what: str = "--model") -> None:
    names = known_model_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `python -c \"import timm; print(timm.list_models())\"` lists them"
    raise UserError(f"argument {what}: timm has no model '{name}'{hint}")


def _looks_like_safetensors(path: str) -> bool:
    """A safetensors file under another name: 8 bytes of header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= os.path.getsize(path)


def read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        if path.endswith(".safetensors") or _looks_like_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint '{path}' cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model", "module"):  # common wrappers
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"checkpoint '{path}' holds no state_dict of tensors")
    if all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[7:]: v for k, v in state.items()}
    return state


def head_classes(state: dict, model: nn.Module) -> int | None:
    """Number of classes of the classifier in `state`, for the model's classifier."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return None
    head = get()
    if isinstance(head, (tuple, list)):  # DeiT distilled: (head, head_dist)
        head = head[0]
    for name, mod in model.named_modules():
        if mod is head and isinstance(mod, nn.Linear):
            w = state.get(f"{name}.weight")
            return int(w.shape[0]) if w is not None else None
    return None


def new_head_state(model: nn.Module, state: dict, classes: int) -> dict:
    """`state` with its `classes`-way classifier (every tensor whose first dimension is `classes`
    where the model's is another: the head, DeiT's distillation head, their biases) replaced by the
    model's own freshly initialised tensors. Fine-tuning on other classes
    keeps every other weight (what timm does for pretrained weights with another num_classes)."""
    own = model.state_dict()
    keys = [k for k, v in state.items() if k in own and v.dim() >= 1 and v.shape[0] == classes
            and own[k].shape[0] != classes and tuple(v.shape[1:]) == tuple(own[k].shape[1:])]
    return {**state, **{k: own[k] for k in keys}}


def create_model(name: str, *, num_classes: int | None = None, checkpoint: str | None = None,
                 pretrained: bool = False, what: str = "--model", model_kwargs: dict | None = None,
                 new_head: bool = False, **kwargs) -> nn.Module:
    """timm.create_model with checked name, class count and weights. The model remembers where its
    weights came from in `model.vitfast_weights` ("checkpoint:<path>", "pretrained" or "random").
    new_head: a checkpoint whose head has other classes than the model's loads every other weight
    and keeps the model's new head (`model.vitfast_new_head` = the file's class count; a model
    to fine-tune on other data) instead of being refused."""
    import timm

    check_model_name(name, what)
    kwargs = {**(model_kwargs or {}), **kwargs}  # the user's --model-kwargs (a dict: num_classes may be in it)
    if "num_classes" in kwargs:  # said in the model's arguments (--model-kwargs num_classes=N)
        given = kwargs.pop("num_classes")
        if num_classes is not None and given != num_classes:
            raise UserError(f"argument --num-classes {num_classes} and num_classes={given} in the model's arguments "
                            "disagree; give one")
        num_classes = given
    if num_classes is not None:
        if num_classes < 1:
            raise UserError(f"argument --num-classes must be >= 1, got {num_classes}")
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained and not checkpoint, **kwargs)
    except Exception as exc:
        if pretrained:
            raise UserError(f"pretrained weights for '{name}' could not be loaded ({str(exc).splitlines()[0]}); "
                            "download them elsewhere and pass --checkpoint FILE") from exc
        # the name is registered (checked above), so the arguments are what the constructor refused
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        first = (str(exc).splitlines() or [""])[0]
        raise UserError(f"argument {what} {name}: timm could not build it with {given or 'its defaults'} "
                        f"({type(exc).__name__}: {first}); check --model-kwargs") from exc
    source = "pretrained" if pretrained and not checkpoint else "random"
    model.vitfast_new_head = None
    if checkpoint:
        state = read_state_dict(checkpoint)
        have, want = head_classes(state, model), getattr(model, "num_classes", None)
        if new_head and have is not None and want is not None and have != want:
            state = new_head_state(model, state, have)
            model.vitfast_new_head = have
        try:
            describe_mismatch(model, state, checkpoint)
        except CheckpointError as exc:
            if have is not None and want is not None and have != want:
                raise UserError(f"checkpoint '{checkpoint}' has a {have}-class head, the model {want}: "
                                f"pass --num-classes {have}") from exc
            raise
        model.load_state_dict(state)
        source = f"checkpoint:{checkpoint}"
    model.vitfast_weights = source
    return model
