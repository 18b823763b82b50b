"""Streaming covariance of features: the statistics AFM needs from each linear layer."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import _ext
from ._checks import check_covariance_args, fail, has_data

# CUDA routes of covariance_update_ (see its docstring)
METHODS = ("auto", "split_gemm", "tensor_core", "simt")

if _ext.extension_loaded():

    @torch.library.register_fake("vitfast::covariance_update_")
    def _covariance_update_fake(count, mean, m2, y, method="auto"):
        check_covariance_args(count, mean, m2, y)
        return None


def covariance_update_reference(count, mean, m2, y) -> None:
    """In-place Chan merge of batch y into (count, mean, m2), all float64 (the spec)."""
    yd = y.to(torch.float64)
    n, nb = count.item(), yd.shape[0]
    if nb == 0:
        return
    mu_b = yd.mean(0)
    yc = yd - mu_b
    delta = mu_b - mean
    total = n + nb
    m2.add_(yc.T @ yc).add_(torch.outer(delta, delta), alpha=n * nb / total)
    mean.add_(delta, alpha=nb / total)
    count.fill_(total)


def covariance_update_(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, y: torch.Tensor,
                       method: str = "auto") -> None:
    """Merge the rows of y (N, m) into the float64 state (count 0-d, mean (m,), m2 (m, m)).

    Only the upper triangle of m2 is maintained on CUDA; use `symmetric_m2` to read it.
    `method` picks the CUDA route (the CPU path is float64 whatever it says):
    "split_gemm" (centred values split into bf16 planes, cuBLAS GEMMs with fp32 accumulation,
    float64 merge; "auto" uses it on sm_80+ for 128 <= m <= 8192), "tensor_core" (one 3xTF32
    kernel, no workspace) or "simt" (fp32 FMA, any GPU)."""
    if method not in METHODS:
        fail(ValueError, "covariance_update", "method", f"must be one of {METHODS}, got {method!r}")
    if _ext.native(y.device):
        torch.ops.vitfast.covariance_update_(count, mean, m2, y, method)
        return
    _ext.warn_fallback("covariance_update", y.device)
    check_covariance_args(count, mean, m2, y)
    if has_data(y):  # meta tensors: shapes checked, nothing to compute
        covariance_update_reference(count, mean, m2, y)


def symmetric_m2(m2: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from its upper triangle."""
    upper = torch.triu(m2)
    return upper + torch.triu(m2, diagonal=1).T


class CovarianceAccumulator:
    """Count, mean and centred second moment of a stream of feature rows, in float64.

    >>> acc = CovarianceAccumulator(768, device="cuda")
    >>> for y in batches: acc.update(y)        # y: (..., 768), any float dtype
    >>> cov, mean = acc.covariance(), acc.mean
    """

    def __init__(self, num_features: int, device="cpu", method: str = "auto"):
        if num_features < 1:
            raise ValueError(f"CovarianceAccumulator: argument 'num_features' must be >= 1, got {num_features}")
        if method not in METHODS:
            raise ValueError(f"CovarianceAccumulator: argument 'method' must be one of {METHODS}, got {method!r}")
        self.num_features = num_features
        self.method = method
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.mean = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, y: torch.Tensor) -> None:
        if y.shape[-1] != self.num_features:
            raise ValueError(f"CovarianceAccumulator.update: argument 'y' must have {self.num_features} features in its "
                             f"last dim, got shape {list(y.shape)}")
        covariance_update_(self.count, self.mean, self.m2, y.detach().reshape(-1, self.num_features), self.method)

    @torch.no_grad()
    def merge(self, other: "CovarianceAccumulator") -> None:
        """Fold another accumulator's statistics into this one (Chan's parallel formula)."""
        n, nb = self.count.item(), other.count.item()
        if nb == 0:
            return
        total = n + nb
        delta = other.mean.to(self.mean.device) - self.mean
        self.m2 = symmetric_m2(self.m2) + symmetric_m2(other.m2.to(self.m2.device))
        self.m2.add_(torch.outer(delta, delta), alpha=n * nb / total)
        self.mean.add_(delta, alpha=nb / total)
        self.count.fill_(total)

    @torch.no_grad()
    def all_reduce(self, group=None) -> None:
        """Combine the statistics of every rank of a torch.distributed group (DDP collection)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        world = dist.get_world_size(group)
        counts = [torch.zeros_like(self.count) for _ in range(world)]
        means = [torch.zeros_like(self.mean) for _ in range(world)]
        m2s = [torch.zeros_like(self.m2) for _ in range(world)]
        dist.all_gather(counts, self.count, group=group)
        dist.all_gather(means, self.mean, group=group)
        dist.all_gather(m2s, symmetric_m2(self.m2).contiguous(), group=group)
        merged = CovarianceAccumulator(self.num_features, self.mean.device)
        for c, mu, m2 in zip(counts, means, m2s):
            part = CovarianceAccumulator(self.num_features, self.mean.device)
            part.count, part.mean, part.m2 = c, mu, m2
            merged.merge(part)
        self.count, self.mean, self.m2 = merged.count, merged.mean, merged.m2

    def covariance(self, unbiased: bool = False) -> torch.Tensor:
        n = self.count.item()
        if n < (2 if unbiased else 1):
            raise ValueError(f"CovarianceAccumulator: {int(n)} rows seen, too few for a covariance")
        return symmetric_m2(self.m2) / (n - 1 if unbiased else n)

    def second_moment(self) -> torch.Tensor:
        """E[y y^T] (uncentred), from the same state."""
        return self.covariance() + torch.outer(self.mean, self.mean)
