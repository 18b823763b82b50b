"""LowRankLinear: a linear layer as two thinner ones, W ~ W2 W1 (rank k)."""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """y = second(first(x)), first: in -> rank, second: rank -> out.

    AFM: first = (U_k^T W, U_k^T b), second = (U_k, E[y] - U_k U_k^T E[y]), where U_k spans the top
    principal directions of the layer's outputs. SVD baseline: first = S_k^1/2 V_k^T, second = U_k S_k^1/2."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"LowRankLinear: argument 'rank' must be in [1, {min(in_features, out_features)}], got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=bias, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @staticmethod
    def params_for(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
        return rank * in_features + (rank if bias else 0) + out_features * rank + out_features

    @classmethod
    def from_afm(cls, linear: nn.Linear, basis: torch.Tensor, mean: torch.Tensor) -> "LowRankLinear":
        """basis: (out, k) orthonormal top-k eigenvectors of Cov(y); mean: E[y] (out,)."""
        w = linear.weight.detach().double()
        u = basis.to(w.device, torch.float64)
        mu = mean.to(w.device, torch.float64)
        layer = cls(linear.in_features, linear.out_features, u.shape[1], bias=linear.bias is not None,
                    device=w.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(u.T @ w)
            if linear.bias is not None:
                layer.first.bias.copy_(u.T @ linear.bias.detach().double())
            layer.second.weight.copy_(u)
            layer.second.bias.copy_(mu - u @ (u.T @ mu))
        return layer

    @classmethod
    def from_svd(cls, linear: nn.Linear, rank: int) -> "LowRankLinear":
        """Truncated SVD of the weight (the classical baseline)."""
        w = linear.weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        layer = cls(linear.in_features, linear.out_features, rank, bias=False, device=w.device,
                    dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(root[:, None] * vh[:rank])
            layer.second.weight.copy_(u[:, :rank] * root)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias.detach())
            else:
                layer.second.bias.zero_()
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def linear_layers(model: nn.Module, include=None, exclude=("head",)) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by qualified name, less `exclude` prefixes (the classifier by
    default), restricted to names containing one of `include` when given."""
    out = {}
    inside_lowrank = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for c in ("first", "second")}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name not in inside_lowrank:
            if any(name == e or name.startswith(e + ".") for e in exclude or ()):
                continue
            if include and not any(s in name for s in include):
                continue
            out[name] = mod
    return out
