"""`vitfast minivit`: weight multiplexing + weight distillation of a timm ViT/DeiT or Swin model;
with no model and no data, the embedded default (the paper's ablation in small on the digits)."""
from __future__ import annotations

import argparse
import os

from ..engine.cli_args import (HelpFormatter, add_config_arg, add_model_kwargs_arg, add_run_args, add_train_args, input_size,
                               model_kwargs, resolve_workers, train_config)


def add_parser(sub) -> None:
    from .pipeline import RELATION_IMPLS, MiniViTConfig

    d = MiniViTConfig()
    p = sub.add_parser("minivit", help="MiniViT weight multiplexing + distillation (no arguments: the embedded "
                       "default ablation)", formatter_class=HelpFormatter)
    add_config_arg(p)
    g = p.add_argument_group("model")
    g.add_argument("--teacher", "--model", dest="teacher", help="timm ViT/DeiT or Swin name (default: the embedded "
                   "digits teacher)")
    g.add_argument("--checkpoint", help="the teacher's weights (.safetensors or a torch state_dict)")
    g.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs the hub)")
    g.add_argument("--num-classes", type=int)
    add_model_kwargs_arg(g)
    g = p.add_argument_group("multiplexing")
    g.add_argument("--share", default=d.share, help="layers per group, 'stage', or groups like '0,1;2,3'")
    g.add_argument("--init", choices=["first", "mean", "random"], default=d.init)
    g.add_argument("--no-head-mix", dest="heads_mix", action="store_false", help="no head-mixing transforms")
    g.add_argument("--mlp-transform", choices=["residual", "official", "none"], default=d.mlp_transform)
    g.add_argument("--init-from", metavar="MINI_DIR",
                   help="start from a saved Mini model (a run's mini_model/) instead of the teacher's weights: a "
                        "finished run trained longer, or on other data; same teacher, --share and transforms")
    g = p.add_argument_group("distillation")
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the label loss; predictions get 1 - alpha")
    g.add_argument("--no-prediction-distillation", dest="distill_predictions", action="store_false")
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--attn-weight", type=float, default=d.attn_weight, help="attention-relation loss weight")
    g.add_argument("--hidden-weight", type=float, default=d.hidden_weight, help="hidden-relation loss weight")
    g.add_argument("--relation-heads", type=int, default=d.relation_heads)
    g.add_argument("--relation-impl", choices=RELATION_IMPLS, default=d.relation_impl,
                   help="fused (default): each relation loss computes value and gradient together, a chunk of "
                        "windows at a time, keeping no (B, heads, N, N) relation for the backward (autograd keeps "
                        "GBs of them at ImageNet shapes), the softmaxes and cross-entropy of every relation row in one "
                        "fused kernel pass; chunked: the same with eager float32 softmaxes; same values")
    g.add_argument("--distill-teacher", help="timm name of the model distilled from, if not the original (official "
                   "Mini-Swin: swin_base_patch4_window7_224 for every size); same classes, image size and tokens per "
                   "window at the paired layers")
    g.add_argument("--distill-checkpoint", help="--distill-teacher's weights (.safetensors or a torch state_dict)")
    g.add_argument("--distill-pretrained", action="store_true", help="timm's pretrained weights for --distill-teacher")
    add_model_kwargs_arg(g, "--distill-model-kwargs", of="--distill-teacher")
    g.add_argument("--layer-pairs", help="student:teacher layer pairs, e.g. '1:1,3:3' (default: the official rule)")
    g.add_argument("--store", help="a TinyViT logit store (vitfast tinyvit save-logits) for the prediction term: "
                                   "images replayed with the store's augmentation, no teacher run for predictions")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="ImageFolder training directory (default: the embedded digits)")
    g.add_argument("--eval-data", help="ImageFolder directory evaluated each epoch (streamed)")
    g.add_argument("--unlabeled", action="store_true",
                   help="read --data as unlabeled images even if its folders are not the teacher's classes "
                        "(--alpha 0: distillation alone needs no labels; a plain folder of images is read so anyway)")
    g.add_argument("--input-size", help="N or C,H,W (default: the model's)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--aa", default=d.aa, help="timm auto-augment policy ('none' to disable)")
    g.add_argument("--reprob", type=float, default=d.reprob)
    g.add_argument("--mixup", type=float, default=d.mixup)
    g.add_argument("--cutmix", type=float, default=d.cutmix)
    g.add_argument("--smoothing", type=float, default=d.smoothing)
    add_train_args(p, d.train)
    add_run_args(p, d.output)
    g = p.add_argument_group("embedded default")
    g.add_argument("--ablation", dest="ablation", action="store_true", default=None,
                   help="the ablation over variants, sharing degrees and seeds (default with the embedded data)")
    g.add_argument("--no-ablation", dest="ablation", action="store_false", help="one run of the full method")
    g.add_argument("--seeds", type=int, default=3, help="seeds of the ablation")
    p.set_defaults(func=run)


def config_from_args(a):
    from dataclasses import replace

    from .pipeline import MiniViTConfig, digits_config

    embedded = a.teacher is None and a.data is None
    base = digits_config() if embedded else MiniViTConfig()
    explicit = {k for k in vars(a) if getattr(a, k) != getattr(_defaults(), k, object())}
    cfg = replace(base, teacher=a.teacher, checkpoint=a.checkpoint, pretrained=a.pretrained, num_classes=a.num_classes,
                  model_kwargs=model_kwargs(a.model_kwargs),
                  share=a.share, init=a.init, heads_mix=a.heads_mix,
                  mlp_transform=None if a.mlp_transform == "none" else a.mlp_transform, alpha=a.alpha,
                  distill_predictions=a.distill_predictions, temperature=a.temperature, attn_weight=a.attn_weight,
                  hidden_weight=a.hidden_weight, relation_heads=a.relation_heads, relation_impl=a.relation_impl,
                  layer_pairs=a.layer_pairs, distill_teacher=a.distill_teacher,
                  distill_checkpoint=a.distill_checkpoint, distill_pretrained=a.distill_pretrained,
                  distill_model_kwargs=model_kwargs(a.distill_model_kwargs),
                  store=a.store, init_from=a.init_from,
                  data=a.data, eval_data=a.eval_data, unlabeled=a.unlabeled, input_size=input_size(a.input_size), output=a.output,
                  resume=a.resume, device=a.device, progress=a.progress)
    # the embedded default keeps its own recipe unless an option was given explicitly
    for name in ("batch_size", "aa", "reprob", "mixup", "cutmix", "smoothing", "workers"):
        if not embedded or name in explicit:
            value = getattr(a, name)
            if name == "workers":
                value = resolve_workers(value)
            cfg = replace(cfg, **{name: None if name == "aa" and value == "none" else value})
    train = train_config(a)
    if embedded:
        t = base.train
        train = replace(t, **{k: getattr(train, k) for k in vars(t) if _train_explicit(k, explicit)})
    return replace(cfg, train=train)


_TRAIN_ARGS = {"epochs": "epochs", "lr": "lr", "weight_decay": "weight_decay", "warmup_epochs": "warmup_epochs",
               "min_lr": "min_lr", "clip_grad": "clip_grad", "ema_decay": "ema", "amp_dtype": "amp_dtype", "seed": "seed",
               "compile": "compile", "checkpoint_every": "checkpoint_every"}


def _train_explicit(field_name, explicit) -> bool:
    return _TRAIN_ARGS.get(field_name) in explicit


_DEFAULTS = None


def _defaults():
    global _DEFAULTS
    if _DEFAULTS is None:
        import argparse as ap

        parser = ap.ArgumentParser()
        sub = parser.add_subparsers()
        add_parser(sub)
        _DEFAULTS = parser.parse_args(["minivit"])
    return _DEFAULTS


def run(a) -> int:
    from .. import distributed as vdist
    from .pipeline import run_minivit

    vdist.setup(a.device)
    cfg = config_from_args(a)
    out = run_minivit(cfg, ablation=a.ablation, seeds=tuple(range(a.seeds)))
    if vdist.rank_world()[0] == 0:
        with open(os.path.join(cfg.output, "report.md")) as f:
            print(f.read().split("![")[0].rstrip())
        print(f"\nwrote {cfg.output}/report.md, report.json, training_curves.png, mini_model/ "
              "(vitfast.minivit.load_mini)")
    vdist.cleanup()
    return 0 if out else 1
