"""vitfast.minivit.multiplex: turn a timm ViT/DeiT or Swin (v1) model into its MiniViT version, and
save / load Mini models (safetensors + structure.json, rebuilt from the timm name alone)."""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..errors import UserError
from .modules import (HeadMix, MiniSwinBlock, MiniViTBlock, MlpTransform, SharedWeights, check_block, grid_of,
                      record_token_grid)

FORMAT = "vitfast-minivit/1"
INITS = ("first", "mean", "random")


def _arch(model: nn.Module) -> str:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer):
        return "swin"
    raise UserError(f"MiniViT supports timm VisionTransformer (ViT/DeiT) and SwinTransformer (v1) models, "
                    f"not {type(model).__name__}")


def stage_blocks(model: nn.Module) -> list[list[nn.Module]]:
    """The blocks of each stage (a ViT has one stage)."""
    if _arch(model) == "vit":
        return [list(model.blocks)]
    return [list(stage.blocks) for stage in model.layers]


def parse_share(share, depths: list[int]) -> list[list[int]]:
    """Groups of global layer indices sharing weights.

    share: k (int or "k"): every k consecutive layers of a stage (the last group of a stage may be
    shorter); "stage" or "all": all layers of each stage; or explicit groups, as a list of lists or
    "0,1;2,3,4;5". Groups must cover every layer once, be consecutive, and stay inside a stage."""
    starts = [sum(depths[:s]) for s in range(len(depths))]
    total = sum(depths)
    if isinstance(share, str) and share.strip().isdigit():
        share = int(share)
    if isinstance(share, int):
        if share < 1:
            raise UserError(f"argument --share must be >= 1 (layers per group), got {share}")
        if share > max(depths):
            # Not clamped: a number past the depth is more likely a mistake (a group count, another
            # model's depth) than a request to share whole stages, which 'stage' says plainly.
            raise UserError(f"argument --share: {share} layers per group is more than any stage has "
                            f"(stages of {depths} layers); use --share stage to share each whole stage")
        return [list(range(s + i, s + min(i + share, d))) for s, d in zip(starts, depths) for i in range(0, d, share)]
    if share in ("stage", "all"):
        return [list(range(s, s + d)) for s, d in zip(starts, depths)]
    if isinstance(share, str):
        try:
            share = [[int(v) for v in g.split(",") if v.strip()] for g in share.split(";") if g.strip()]
        except ValueError as exc:
            raise UserError(f"argument --share must be a number, 'stage', or groups like '0,1;2,3', got {share!r}") from exc
    groups = [list(g) for g in share]
    flat = [i for g in groups for i in g]
    if sorted(flat) != list(range(total)):
        raise UserError(f"argument --share: groups {groups} must cover layers 0..{total - 1} exactly once")
    stage_of = {i: s for s, (st, d) in enumerate(zip(starts, depths)) for i in range(st, st + d)}
    for g in groups:
        if g != list(range(g[0], g[0] + len(g))):
            raise UserError(f"argument --share: group {g} is not a run of consecutive layers")
        if len({stage_of[i] for i in g}) > 1:
            raise UserError(f"argument --share: group {g} crosses a stage boundary (stages of {depths} layers)")
    return groups


def _linear_from(sources: list[nn.Linear], init: str) -> nn.Linear:
    first = sources[0]
    lin = copy.deepcopy(first)
    if init == "mean":
        with torch.no_grad():
            lin.weight.copy_(torch.stack([s.weight for s in sources]).mean(0))
            if lin.bias is not None:
                lin.bias.copy_(torch.stack([s.bias for s in sources]).mean(0))
    elif init == "random":
        nn.init.trunc_normal_(lin.weight, std=0.02)
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)
    return lin


def _table_from(blocks: list[nn.Module], init: str) -> nn.Parameter:
    tables = [b.attn.relative_position_bias_table for b in blocks]
    t = tables[0].detach().clone()
    if init == "mean":
        t = torch.stack([x.detach() for x in tables]).mean(0)
    elif init == "random":
        nn.init.trunc_normal_(t, std=0.02)
    return nn.Parameter(t)


def multiplex(model: nn.Module, share=2, *, init: str = "first", heads_mix: bool = True,
              mlp_transform: str | None = "residual") -> nn.Module:
    """A MiniViT copy of `model` (left untouched): consecutive layers in a group share qkv, proj,
    fc1, fc2 (and Swin's relative-position table); each layer keeps its own norm1 / norm2 (and
    LayerScale), gets head-mixing transforms (heads_mix) and an MLP transform (mlp_transform:
    "residual", "official" or None).

    init: "first" -- shared weights from the group's first layer; "mean" -- their mean over the
    group; "random" -- the official recipe (trunc_normal(0.02) shared weights and transforms, for
    training from scratch). With "first"/"mean" the transforms start as the identity, so the Mini
    model starts as close to the original as sharing allows."""
    if init not in INITS:
        raise UserError(f"argument --init must be one of {', '.join(INITS)}, got {init!r}")
    arch = _arch(model)
    mini = copy.deepcopy(model)
    stages = stage_blocks(mini)
    depths = [len(s) for s in stages]
    groups = parse_share(share, depths)
    flat = [b for s in stages for b in s]
    for i, b in enumerate(flat):
        check_block(b, i, arch)
    shared = nn.ModuleList()
    replaced: list[nn.Module] = []
    for group in groups:
        src = [flat[i] for i in group]
        sw = SharedWeights(_linear_from([b.attn.qkv for b in src], init), _linear_from([b.attn.proj for b in src], init),
                           _linear_from([b.mlp.fc1 for b in src], init), _linear_from([b.mlp.fc2 for b in src], init),
                           _table_from(src, init) if arch == "swin" else None)
        shared.append(sw)
        for b in src:
            if arch == "vit":
                m = MiniViTBlock(b, heads_mix, mlp_transform, grid_of(mini), mini.num_prefix_tokens)
            else:
                m = MiniSwinBlock(b, heads_mix, mlp_transform)
            m.set_shared(sw)
            replaced.append(m)
    it = iter(replaced)
    if arch == "vit":
        mini.blocks = nn.Sequential(*[next(it) for _ in range(depths[0])])
        if getattr(mini, "dynamic_img_size", False) and mlp_transform:
            mini.patch_embed.register_forward_pre_hook(record_token_grid)
            for m in mini.blocks:
                object.__setattr__(m, "grid_source", mini.patch_embed)  # a reference, not a submodule
    else:
        for stage in mini.layers:
            stage.blocks = nn.Sequential(*[next(it) for _ in range(len(stage.blocks))])
    mini.minivit_shared = shared
    if init == "random":
        for m in mini.modules():
            if isinstance(m, (HeadMix, MlpTransform)):
                m.reset_official()
    mini.minivit = {"format": FORMAT, "arch": arch, "groups": groups, "heads_mix": heads_mix,
                    "mlp_transform": mlp_transform, "init": init}
    return mini


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: timm's rule (no decay on 1-D parameters and the model's no_weight_decay()
    set) plus no decay on the head-mixing matrices -- they start at the identity, and decay would
    pull them to zero (uniform attention, no output), not back to where they started."""
    from timm.optim import param_groups_weight_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    skip |= {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, HeadMix) for p in ("pre", "post")}
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def mini_blocks(model: nn.Module) -> list[nn.Module]:
    """Every layer's block, in order."""
    return [b for s in stage_blocks(model) for b in s]


def save_mini(model: nn.Module, out_dir: str, base_model: str, model_kwargs: dict | None = None,
              extra: dict | None = None) -> str:
    """out_dir/model.safetensors + out_dir/structure.json: enough to rebuild the Mini model from its
    timm name (load_mini), without the original weights."""
    from safetensors.torch import save_file

    from ..engine.checkpoint import atomic_write, atomic_write_json, state_tensors

    os.makedirs(out_dir, exist_ok=True)
    structure = {**model.minivit, "base_model": base_model, "model_kwargs": model_kwargs or {}, **(extra or {})}
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda tmp: save_file(state_tensors(model), tmp, metadata={"format": FORMAT}))
    atomic_write_json(os.path.join(out_dir, "structure.json"), structure)
    return out_dir


def load_mini(path: str, device="cpu") -> nn.Module:
    """Rebuild a Mini model saved by save_mini / `vitfast minivit` (folder with structure.json and
    model.safetensors, or either file's path; what is missing or unreadable is a UserError naming it)."""
    import timm

    from .. import models  # noqa: F401  (vitfast's own timm registrations)
    from ..engine.checkpoint import describe_mismatch, read_saved_model

    spec, state = read_saved_model(path, FORMAT, "Mini model")
    base = timm.create_model(spec["base_model"], pretrained=False, **spec["model_kwargs"])
    mini = multiplex(base, spec["groups"], init="first", heads_mix=spec["heads_mix"],
                     mlp_transform=spec["mlp_transform"])
    mini.minivit["init"] = spec.get("init", "first")
    describe_mismatch(mini, state, path)
    mini.load_state_dict(state)
    return mini.to(device).eval()
