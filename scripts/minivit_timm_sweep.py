"""Which models of timm's registry vitfast.minivit.multiplex takes: every VisionTransformer and
SwinTransformer name, built with random weights and cut down (2 blocks per stage; Swin also
narrower) so that the sweep runs on a CPU in minutes. A model counts as taken when, sharing nothing,
the Mini model computes what the original does (max |difference| <= 1e-4 of the output's scale) and
a training step with every 2 layers shared runs; otherwise it must be refused with a UserError.
Anything else (an exception, a silent difference) is a bug and makes the exit status 1.

    python scripts/minivit_timm_sweep.py [--prefix vit_ deit swin] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import sys
import warnings

import timm
import torch

import vitfast.models  # noqa: F401
from vitfast.engine.data_config import model_data_config
from vitfast.errors import UserError
from vitfast.minivit import multiplex


def cut_down(name: str) -> torch.nn.Module | None:
    """The model with 2 blocks per stage, or None when it is not a VisionTransformer / Swin v1."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if "swin" not in name:
        model = timm.create_model(name, pretrained=False, num_classes=10, depth=2)
        return model.eval() if isinstance(model, VisionTransformer) else None
    model = timm.create_model(name, pretrained=False, num_classes=10, depths=(2, 2, 2, 2), embed_dim=32,
                              num_heads=(1, 2, 4, 8))  # every Swin v1 of timm has 4 stages
    return model.eval() if isinstance(model, SwinTransformer) else None


def check(model: torch.nn.Module) -> str:
    x = torch.randn(1, *model_data_config(model)["input_size"])
    with torch.no_grad():
        ref = model(x)
        out = multiplex(model, share=1).eval()(x)
    err = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    multiplex(model, share=2).train()(x).sum().backward()
    return "taken" if err <= 1e-4 else f"DIFFERS (relative {err:.1e})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", nargs="+", default=["vit_", "deit", "swin"])
    p.add_argument("--markdown", help="also write the table of refused and failing models here")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    tally, rows = collections.Counter(), []
    for name in sorted(n for n in timm.list_models() if n.startswith(tuple(a.prefix))):
        try:
            model = cut_down(name)
        except Exception:  # noqa: BLE001  (a name whose constructor takes no depth: not a ViT/Swin)
            model = None
        if model is None:
            tally["not ViT/Swin v1"] += 1
            continue
        kind = "swin" if "swin" in name else "vit"
        try:
            verdict = check(model)
        except UserError as exc:
            verdict = f"refused: {exc}"
        except Exception as exc:  # noqa: BLE001
            verdict = f"ERROR {type(exc).__name__}: {str(exc)[:160]}"
        tally[f"{kind} {verdict.split(':')[0].split(' (')[0]}"] += 1
        if verdict != "taken":
            rows.append((name, verdict))
            print(f"{name}: {verdict}", flush=True)
    header = (f"{datetime.date.today()}, timm {timm.__version__}, torch {torch.__version__}, CPU: "
              + ", ".join(f"{k} {v}" for k, v in sorted(tally.items())))
    print(header)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(f"`python scripts/minivit_timm_sweep.py` -- {header}\n\n| model | verdict |\n|---|---|\n")
            f.writelines(f"| {n} | {v} |\n" for n, v in rows)
    return 1 if any(not v.startswith("refused") for _, v in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
