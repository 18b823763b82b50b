"""MiniViT: weight multiplexing of pretrained ViT/DeiT and Swin models with weight distillation
(`vitfast minivit`)."""
from .multiplex import load_mini, mini_blocks, multiplex, parse_share, save_mini

__all__ = ["load_mini", "mini_blocks", "multiplex", "parse_share", "save_mini"]
