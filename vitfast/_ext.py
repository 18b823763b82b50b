"""Loads the compiled extension and says, once, when an op has to fall back to PyTorch.

vitfast imports without its extension (or with a CPU-only build): every op then runs its
pure-PyTorch reference. That is correct but slow, so it is never silent: a warning at import when
the extension is missing, and a one-time warning per (op, device type) whenever a tensor takes the
fallback path.
"""
from __future__ import annotations

import functools
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


def _has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.build_info()["cuda"])


# Asked on every op call (native()): build_info() walks and sorts every op name the dispatcher
# knows, ~0.4 ms, which the first H100 run measured as a fixed cost on every vitfast op. The
# answer cannot change while the process runs.
_CUDA_KERNELS_BUILT = _has_cuda_kernels()


def cuda_kernels_built() -> bool:
    return _CUDA_KERNELS_BUILT


@functools.lru_cache(maxsize=None)
def _head_mix_fits_cuda(index: int, dtype: str, heads: int, dim_k: int, dim_v: int, mix_grad: bool,
                        bias_grad: bool) -> tuple[bool, bool]:
    with torch.cuda.device(index):
        fwd, bwd = _C.head_mix_fits(dtype, heads, dim_k, dim_v, mix_grad, bias_grad)
    return bool(fwd), bool(bwd)


def head_mix_fits(device: torch.device, dtype: torch.dtype, heads: int, dim_k: int, dim_v: int, mix_grad: bool,
                  bias_grad: bool) -> tuple[bool, bool]:
    """(forward, backward): whether head_mix_attention's fused CUDA kernels have a launch
    configuration for this shape on `device` (a block holds every head of a window; float32 /
    float64 with many or wide heads can exceed the shared memory). Always true off CUDA."""
    if device.type != "cuda" or not cuda_kernels_built():
        return True, True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _head_mix_fits_cuda(index, str(dtype).removeprefix("torch."), int(heads), int(dim_k), int(dim_v),
                               bool(mix_grad), bool(bias_grad))


@functools.lru_cache(maxsize=None)
def _window_attention_fits_cuda(index: int, dtype: str, heads: int, dim_k: int, dim_v: int,
                                bias_grad: bool) -> tuple[bool, bool]:
    with torch.cuda.device(index):
        fwd, bwd = _C.window_attention_fits(dtype, heads, dim_k, dim_v, bias_grad)
    return bool(fwd), bool(bwd)


def window_attention_fits(device: torch.device, dtype: torch.dtype, heads: int, dim_k: int, dim_v: int,
                          bias_grad: bool) -> tuple[bool, bool]:
    """(forward, backward): whether window_attention's fused CUDA kernels have a launch
    configuration for this shape on `device` (float64 with wide heads can exceed a block's shared
    memory). Always true off CUDA."""
    if device.type != "cuda" or not cuda_kernels_built():
        return True, True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _window_attention_fits_cuda(index, str(dtype).removeprefix("torch."), int(heads), int(dim_k), int(dim_v),
                                       bool(bias_grad))


def window_attention_route(device: torch.device, dtype: torch.dtype, tokens: int, heads: int, dim_k: int,
                           dim_v: int) -> str:
    """Which kernels window_attention runs for this shape: 'registers' (fp16/bf16, <= 64 tokens,
    head dims <= 64, sm_80+), 'tiles' (CUDA, everything else; VITFAST_WINDOW_ATTENTION_ROUTE=tiles
    forces it) or 'cpu'. Read at each call (the variable may change between calls)."""
    if device.type != "cuda" or not cuda_kernels_built():
        return "cpu"
    with torch.cuda.device(device):
        return _C.window_attention_route(str(dtype).removeprefix("torch."), int(tokens), int(heads), int(dim_k),
                                         int(dim_v))


def head_mix_attention_route(device: torch.device, dtype: torch.dtype, tokens: int, heads: int, dim_k: int,
                             dim_v: int, table: bool = False, mask: bool = False) -> str:
    """Which kernels head_mix_attention(impl="fused") runs for this shape, with or without a bias
    table and a mask: 'registers' (fp16/bf16, <= 64 tokens, head dims <= 32, 3 or 4 heads, sm_80+),
    'stream' (the streaming register forward and backward: fp16/bf16, 3/4/6/8/12 heads of <= 64
    channels, 12 of 48-64 on the head-split backward, 16 of <= 32 on the head-split forward and
    backward, any length, with or without table and mask; with a table while two per-SM blocks of
    heads x tokens^2 table-gradient sums stay within 128 MiB), 'stream+tiles' (the streaming or
    head-split forward and the tile backward, where those sums do not fit or
    VITFAST_HEAD_MIX_STREAM_BWD=0, and for 16 heads of 48-64 and 24 of <= 32 -- 24 heads of 32 fit
    no tile-backward block in 16 bits, so the op runs its composite backward; a call with a table or mask
    whose pre-mixed bias would exceed 64 MiB runs the tiles instead), 'tiles' (CUDA, everything else;
    VITFAST_WINDOW_ATTENTION_ROUTE=tiles forces it) or 'cpu'."""
    if device.type != "cuda" or not cuda_kernels_built():
        return "cpu"
    with torch.cuda.device(device):
        return _C.head_mix_attention_route(str(dtype).removeprefix("torch."), int(tokens), int(heads), int(dim_k),
                                           int(dim_v), bool(table), bool(mask))


@functools.lru_cache(maxsize=None)
def _head_mix_stream_cuda(index: int, dtype: str, heads: int, dim_k: int, dim_v: int) -> bool:
    with torch.cuda.device(index):
        # 65 tokens: past the register kernels (<= 64), so only the streaming rule decides
        return _C.head_mix_attention_route(dtype, 65, heads, dim_k, dim_v, False, False) in ("stream", "stream+tiles")


def head_mix_stream_fits(device: torch.device, dtype: torch.dtype, heads: int, dim_k: int, dim_v: int) -> bool:
    """Whether head_mix_attention's forward of a sequence (more than 64 tokens, no table) runs the
    streaming register kernel on `device`: the shape rule plus what the GPU decides (sm_80+, the
    kernel's shared memory: 12 heads of 64 need 179 KB, more than an A100 offers). Cached per
    shape: VITFAST_WINDOW_ATTENTION_ROUTE=tiles set after the first ask is not seen here."""
    if device.type != "cuda" or not cuda_kernels_built():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _head_mix_stream_cuda(index, str(dtype).removeprefix("torch."), int(heads), int(dim_k), int(dim_v))


# torch.compile folds the answer into the graph (a constant for given shapes): what
# torch.compiler.assume_constant_result does, without importing torch._dynamo at `import vitfast`
# (1.7 s); tests/test_head_mix_attention.py checks that the decorator still sets this attribute.
head_mix_fits._dynamo_marked_constant = True
head_mix_stream_fits._dynamo_marked_constant = True
window_attention_fits._dynamo_marked_constant = True


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
