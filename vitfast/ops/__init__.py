"""vitfast ops: fused kernels with pure-PyTorch references (vitfast.ops.reference)."""
from . import reference
from .covariance import CovarianceAccumulator, covariance_update_
from .soft_target_ce import sparse_soft_target_cross_entropy
from .topk_softmax import topk_softmax
from .window_attention import qkv_layout, window_attention

# Public op name -> the torch.ops.vitfast entries behind it.
OPS = {
    "topk_softmax": ("topk_softmax",),
    "sparse_soft_target_cross_entropy": ("sparse_soft_target_ce_forward", "sparse_soft_target_ce_backward"),
    "covariance_update": ("covariance_update_",),
    "window_attention": ("window_attention_forward", "window_attention_backward"),
}

__all__ = ["topk_softmax", "sparse_soft_target_cross_entropy", "covariance_update_", "CovarianceAccumulator",
           "window_attention", "qkv_layout",
           "reference", "OPS"]
