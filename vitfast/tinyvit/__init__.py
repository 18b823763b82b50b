"""TinyViT fast pretraining distillation: sparse logit store, replayable augmentation, save + distill."""
from .replay import ReplayAugment, epoch_plan, sample_seed, seeded
from .store import LogitStore, StoreError, StoreMeta, decode, encode, read_meta, write_shard
from .train import distill, save_logits

__all__ = ["LogitStore", "ReplayAugment", "StoreError", "StoreMeta", "decode", "distill", "encode", "epoch_plan",
           "read_meta", "sample_seed", "save_logits", "seeded", "write_shard"]
