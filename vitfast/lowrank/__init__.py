"""AAFM + GFM low-rank compression (feature mimicking) for any model built of nn.Linear layers."""
from .checkpoint import load_compressed, save_compressed
from .layers import LowRankLinear, linear_layers
from .pipeline import LowRankConfig, run_lowrank
from .stats import collect_linear_stats, dims_for_energy, pca

__all__ = ["LowRankLinear", "LowRankConfig", "collect_linear_stats", "dims_for_energy", "linear_layers",
           "load_compressed", "pca", "run_lowrank", "save_compressed"]
