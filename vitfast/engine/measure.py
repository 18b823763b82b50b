"""Model measurements every report uses: parameters, MACs of one forward, inference images/s."""
from __future__ import annotations

import torch
from torch import nn

from ..timing import time_ms
from .trainer import autocast_for


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of `example` (all matmuls/convs; fused attention ops
    count through their fake kernels as nothing, so attention products are added by the caller
    where it matters)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() // 2


def throughput(model: nn.Module, example_batch: torch.Tensor, device, amp=True) -> float:
    """Images per second of inference on `device` (median timing)."""
    device = torch.device(device)
    x = example_batch.to(device)
    model.eval()

    def run():
        with torch.no_grad(), autocast_for(device, amp):
            model(x)

    ms = time_ms(run, device, warmup=3, reps=10 if device.type == "cpu" else 50)
    return x.shape[0] / (ms / 1e3)
