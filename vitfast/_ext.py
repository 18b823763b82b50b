"""Loads the compiled extension and says, once, when an op has to fall back to PyTorch.

vitfast imports without its extension (or with a CPU-only build): every op then runs its
pure-PyTorch reference. That is correct but slow, so it is never silent: a warning at import when
the extension is missing, and a one-time warning per (op, device type) whenever a tensor takes the
fallback path.
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    if os.environ.get("VITFAST_DISABLE_EXTENSION") == "1":  # debugging: force the reference path
        raise ImportError("disabled by VITFAST_DISABLE_EXTENSION=1")
    from . import _C  # registers torch.ops.vitfast.* as a side effect
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built, disabled, or built against another torch
    _C = None
    _IMPORT_ERROR = exc
    warnings.warn(
        f"vitfast: the compiled extension vitfast._C could not be imported ({exc}); every vitfast op "
        "runs its pure-PyTorch reference (slow). Build it with `pip install --no-build-isolation -e .` "
        "or `bash scripts/install.sh`.",
        RuntimeWarning,
        stacklevel=2,
    )

_warned: set[tuple[str, str]] = set()


def extension_loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """What was compiled: version, CUDA kernels in or not, architectures, ops."""
    if _C is None:
        return {"loaded": False, "cuda": False, "error": repr(_IMPORT_ERROR), "ops": []}
    info = dict(_C.build_info())
    info["loaded"] = True
    return info


def cuda_kernels_built() -> bool:
    return _C is not None and bool(_C.build_info()["cuda"])


def native(device: torch.device) -> bool:
    """True when vitfast has a compiled kernel for tensors on `device`."""
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return cuda_kernels_built()
    # meta tensors dispatch to the ops' fake kernels (shapes and argument checks)
    return device.type == "meta"


def warn_fallback(op: str, device: torch.device) -> None:
    key = (op, device.type)
    if key in _warned:
        return
    _warned.add(key)
    why = "the extension is not loaded" if _C is None else f"this build has no {device.type} kernels"
    warnings.warn(
        f"vitfast.{op}: {why}; {device.type} tensors run the pure-PyTorch reference (slow). "
        "See `python -m vitfast info`.",
        RuntimeWarning,
        stacklevel=3,
    )


def fallback_ops() -> dict[str, list[str]]:
    """For each device type, the ops that would run on the reference path."""
    from .ops import OPS

    out = {}
    for dev in ("cpu", "cuda"):
        out[dev] = [name for name in OPS if not native(torch.device(dev))]
    return out
