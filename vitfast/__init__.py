"""vitfast: fused CUDA kernels and pipelines that make vision transformers small and fast to train."""
from ._ext import build_info, cuda_kernels_built, extension_loaded
from .ops import (dense_soft_target_cross_entropy, head_mix_attention, sparse_soft_target_cross_entropy, topk_softmax,
                  window_attention)
from .patching import patch, patchable, patched_modules, register_patch, unpatch


def load_compressed(path: str, device="cpu"):
    """Rebuild a model compressed by `vitfast lowrank` (see vitfast.lowrank)."""
    from .lowrank import load_compressed as _load

    return _load(path, device)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "cuda_kernels_built",
    "extension_loaded",
    "load_compressed",
    "patch",
    "patchable",
    "patched_modules",
    "register_patch",
    "unpatch",
    "window_attention",
    "head_mix_attention",
    "sparse_soft_target_cross_entropy",
    "dense_soft_target_cross_entropy",
    "topk_softmax",
]
