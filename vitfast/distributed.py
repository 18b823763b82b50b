"""torchrun support: process-group set-up from the environment, and small helpers."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) initialises the process group:
    NCCL with one GPU per local rank, or gloo on CPU. Without torchrun: (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world <= 1:
        return 0, 1, want
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        torch.cuda.set_device(local)
        want = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), want


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def all_gather_objects(obj) -> list:
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
