"""`vitfast lowrank`: AAFM + GFM on a timm model and an ImageFolder proxy set; with no model or
data given, on the embedded digits teacher and data set."""
from __future__ import annotations

import os

import torch


def add_parser(sub) -> None:
    from ..engine.cli_args import (HelpFormatter, add_checkpoint_every_arg, add_config_arg, add_model_kwargs_arg,
                                   add_progress_arg)

    p = sub.add_parser("lowrank", help="AAFM + GFM low-rank compression (no arguments: the embedded digits default)",
                       formatter_class=HelpFormatter)
    add_config_arg(p)
    p.add_argument("--model", help="timm model name (default: the embedded digits ViT)")
    p.add_argument("--checkpoint", help="weights for --model (.safetensors, or a torch state_dict file)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights for --model (needs the hub)")
    p.add_argument("--num-classes", type=int, help="classes of --model's head, if not its default")
    add_model_kwargs_arg(p)
    p.add_argument("--input-size", help="N or C,H,W: the images --model is fed (default: the size it was built for)")
    p.add_argument("--data", help="ImageFolder directory of unlabeled proxy images")
    p.add_argument("--eval-data", help="ImageFolder directory for accuracy (class folders in the model's order)")
    p.add_argument("--proxy-size", type=int, default=2000, help="proxy images drawn from --data")
    p.add_argument("--target-params", type=float, default=0.67, help="fraction of parameters to keep (or a count)")
    p.add_argument("--rank-step", type=int, default=32, help="ranks are multiples of this")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gfm-epochs", "--epochs", dest="gfm_epochs", type=int, default=30, help="GFM fine-tuning epochs")
    p.add_argument("--gfm-lr", "--lr", dest="gfm_lr", type=float, default=5e-4, help="GFM learning rate")
    p.add_argument("--search-batch", type=int, default=None,
                   help="samples per forward in the AAFM search (batch size x candidate ranks run together; "
                        "default: the batch size on CPU, 1024 on CUDA)")
    p.add_argument("--memory-budget-mb", type=float, help="cap on the statistics held at once (more passes if needed)")
    p.add_argument("--no-svd-baseline", action="store_true", help="skip the weight-SVD comparison")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_progress_arg(p)
    p.add_argument("--amp-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="autocast dtype on CUDA for statistics, search, GFM and evaluation (float32: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student for GFM's training steps")
    add_checkpoint_every_arg(p, what="GFM's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", "--output", dest="out", default="lowrank_out")
    p.set_defaults(func=run)


def _load_model(args):
    """The model to compress, with its weights checked (a randomly initialised model is refused)."""
    from ..engine.cli_args import model_kwargs
    from ..engine.models import create_model
    from ..errors import UserError

    extra = model_kwargs(getattr(args, "model_kwargs", None))
    kwargs = {**extra, **({"num_classes": args.num_classes} if args.num_classes else {})}
    model = create_model(args.model, num_classes=args.num_classes, checkpoint=args.checkpoint,
                         pretrained=getattr(args, "pretrained", False), model_kwargs=extra)
    if model.vitfast_weights == "random" and args.model != "vitfast_digits_vit":
        raise UserError(f"argument --model {args.model}: no weights given (--checkpoint FILE or --pretrained); "
                        "compressing a randomly initialised model would be meaningless")
    if args.model == "vitfast_digits_vit" and model.vitfast_weights == "random":
        from ..models.digits_vit import ASSET, load_weights

        load_weights(model, ASSET)
    return model, kwargs


def run(args) -> int:
    from .. import distributed as vdist
    from .pipeline import LowRankConfig, run_lowrank

    from ..engine import RunDir, file_digest
    from ..engine.cli_args import input_size, model_kwargs
    from ..errors import UserError

    if args.proxy_size < 1:
        raise UserError(f"argument --proxy-size must be >= 1, got {args.proxy_size}")
    rank, world, device = vdist.setup(args.device)
    args.device = str(device)
    cfg = LowRankConfig(target_params=args.target_params, rank_step=args.rank_step, batch_size=args.batch_size,
                        gfm_epochs=args.gfm_epochs, gfm_lr=args.gfm_lr, memory_budget_mb=args.memory_budget_mb,
                        compare_svd=not args.no_svd_baseline, device=args.device, seed=args.seed,
                        progress=rank == 0 and args.progress, search_batch=args.search_batch, amp_dtype=args.amp_dtype,
                        compile=args.compile, gfm_checkpoint_every=args.checkpoint_every)
    cfg.validate()  # every argument before any loading or computing
    if args.model is None and (args.model_kwargs or args.input_size):
        raise UserError("arguments --model-kwargs and --input-size describe --model: give --model too")
    if (args.model is None) != (args.data is None):
        raise UserError("arguments --model and --data go together: give both, or neither (the embedded default)")
    size = input_size(args.input_size)
    model_kwargs(args.model_kwargs)  # a malformed KEY=VALUE is refused here, not after the run started
    # the output folder remembers what it holds: another configuration or other inputs are refused
    # (search_batch, compile and checkpoint_every change the speed or the saving, not what is computed)
    RunDir(args.out, {k: v for k, v in vars(args).items() if k not in ("func", "device", "out", "search_batch",
                                                                          "config", "compile", "checkpoint_every")},
           {"model": args.model, "checkpoint": file_digest(args.checkpoint)},
           folders={"data": args.data, "eval_data": args.eval_data}).start(resume=True)
    if args.model is None and args.data is None:
        from ..data.digits import digits_splits
        from ..models.digits_vit import load_digits_teacher

        model, name, kwargs = load_digits_teacher(), "vitfast_digits_vit", {}
        proxy, _, eval_x, eval_y = digits_splits(seed=0)
        eval_what = "the embedded digits' held-out images"
        if rank == 0:
            print(f"embedded default: the digits ViT teacher, {len(proxy)} unlabeled proxy images, "
                  f"{len(eval_x)} held-out labeled images")
    else:
        from ..engine.cli_args import default_workers
        from ..data.folders import overlap_note
        from ..engine.evaluation import folder_loader, folder_tensors

        model, kwargs = _load_model(args)
        name = args.model
        # the few-shot proxy set (reused by every stage: in memory) and the streamed evaluation set,
        # both through the model's own timm data configuration (timm's validate.py transform)
        proxy, _ = folder_tensors(args.data, model, limit=args.proxy_size, seed=args.seed, input_size=size)
        eval_x = eval_y = eval_what = None
        if args.eval_data:
            loader = folder_loader(args.eval_data, model, args.batch_size, workers=default_workers(), input_size=size)
            eval_x = lambda: loader  # noqa: E731
            note = overlap_note(args.data, args.eval_data, reads="the proxy set is drawn from")
            if note and rank == 0:
                print(note)
            eval_what = f"--eval-data '{args.eval_data}' ({len(loader.dataset)} images)"
            eval_what += f" ({note})" if note else ""
    run_lowrank(model, proxy, cfg, args.out, name, kwargs, eval_x, eval_y, eval_what=eval_what)
    vdist.cleanup()
    if rank != 0:
        return 0
    with open(os.path.join(args.out, "report.md")) as f:
        print(f.read().split("\n\n![")[0])
    print(f"\nwrote {args.out}/compressed (vitfast.load_compressed), report.json, report.md, energy_and_ranks.png")
    return 0
