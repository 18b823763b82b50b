"""vitfast ops: fused kernels with pure-PyTorch references (vitfast.ops.reference)."""
from typing import NamedTuple

from . import reference
from .head_mix_attention import head_mix_attention
from .covariance import CovarianceAccumulator, covariance_update_
from .dense_soft_target_ce import dense_soft_target_cross_entropy
from .soft_target_ce import sparse_soft_target_cross_entropy
from .topk_softmax import topk_softmax
from .window_attention import qkv_layout, window_attention



class Op(NamedTuple):
    torch_ops: tuple  # the torch.ops.vitfast entries behind the public function
    csrc: str         # csrc/<folder> holding its kernels (*_cuda.cu, *_cpu.cpp) and glue (*_op.cpp)


# The one list of vitfast's ops, public name -> Op. It feeds the registration check
# (tests/test_build.py), the CUDA emulator build (tests/cuda_emulation/run_cases.py) and the
# sanitizer cases (scripts/sanitize_cases.py); each fails when an op here lacks its part there.
OPS = {
    "topk_softmax": Op(("topk_softmax",), "topk_softmax"),
    "sparse_soft_target_cross_entropy": Op(("sparse_soft_target_ce_forward", "sparse_soft_target_ce_backward"),
                                           "soft_target_ce"),
    "dense_soft_target_cross_entropy": Op(("dense_soft_target_ce",), "soft_target_ce"),
    "covariance_update": Op(("covariance_update_",), "covariance"),
    "window_attention": Op(("window_attention_forward", "window_attention_backward"), "window_attention"),
    "head_mix_attention": Op(("head_mix_attention_forward", "head_mix_attention_backward"), "window_attention"),
}

__all__ = ["topk_softmax", "sparse_soft_target_cross_entropy", "dense_soft_target_cross_entropy", "covariance_update_", "CovarianceAccumulator",
           "window_attention", "head_mix_attention", "qkv_layout",
           "reference", "OPS", "Op"]
