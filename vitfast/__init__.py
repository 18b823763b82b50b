"""vitfast: fused CUDA kernels and pipelines that make vision transformers small and fast to train."""
from ._ext import build_info, cuda_kernels_built, extension_loaded
from .ops import sparse_soft_target_cross_entropy, topk_softmax

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "cuda_kernels_built",
    "extension_loaded",
    "sparse_soft_target_cross_entropy",
    "topk_softmax",
]
