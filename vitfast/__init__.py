"""vitfast: fused CUDA kernels and pipelines that make vision transformers small and fast to train."""
from ._ext import build_info, cuda_kernels_built, extension_loaded
from .ops import sparse_soft_target_cross_entropy, topk_softmax


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
    "sparse_soft_target_cross_entropy",
    "topk_softmax",
]
