"""vitfast ops: fused kernels with pure-PyTorch references (vitfast.ops.reference)."""
from . import reference
from .soft_target_ce import sparse_soft_target_cross_entropy
from .topk_softmax import topk_softmax

# Public op name -> the torch.ops.vitfast entries behind it.
OPS = {
    "topk_softmax": ("topk_softmax",),
    "sparse_soft_target_cross_entropy": ("sparse_soft_target_ce_forward", "sparse_soft_target_ce_backward"),
}

__all__ = ["topk_softmax", "sparse_soft_target_cross_entropy", "reference", "OPS"]
