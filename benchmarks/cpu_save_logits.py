"""Where `vitfast tinyvit save-logits` spends its time on the CPU: waiting for the data path (the
replayed augmentation) or running the teacher, with 0, 1, ... data-loader workers -- on the embedded
default (digits teacher on 8 x 8 digits) and on an ImageFolder of 224-px PNGs with a timm teacher
(random weights: the timing is the same), TinyViT's augmentation recipe. Reads the split from
save-logits' own per-epoch log line.

    python benchmarks/cpu_save_logits.py [--workers 0 1 2] [--images 256] [--teacher deit_tiny_patch16_224]
        [--markdown out.md]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

LINE = re.compile(r"(\d+) records in ([\d.]+)s \((\d+) img/s; waiting for data ([\d.]+)s = (\d+)%, (\w+)-bound\)")


def make_folder(root: str, images: int, size: int = 256, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        d = os.path.join(root, f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        # smooth random images (PNG-compressible, like photographs more than noise)
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(os.path.join(d, f"{i}.png"))


def make_teacher(path: str, name: str, classes: int = 10) -> None:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(name, num_classes=classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def run(args_list: list[str]) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "vitfast", "tinyvit", "save-logits", *args_list],
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"save-logits failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    epochs = [m.groups() for m in LINE.finditer(p.stdout + p.stderr)]
    last = epochs[-1]  # the last epoch: workers warm, files in the page cache
    return {"records": int(last[0]), "epoch_s": float(last[1]), "img_s": int(last[2]), "wait_s": float(last[3]),
            "wait_pct": int(last[4]), "bound": last[5], "wall_s": time.time() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--teacher", default="deit_tiny_patch16_224")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, weights = os.path.join(tmp, "train"), os.path.join(tmp, "teacher.safetensors")
        make_folder(data, args.images)
        make_teacher(weights, args.teacher)
        for w in args.workers:
            for label, extra in (("embedded default (digits teacher, 8x8 digits, RandomAffine + mixup)", []),
                                 (f"{args.teacher} (random weights), {args.images} PNGs 256 px -> 224, TinyViT "
                                  "recipe (RandAugment, RandomErasing, Mixup/CutMix)",
                                  ["--teacher", args.teacher, "--checkpoint", weights, "--data", data,
                                   "--num-classes", "10", "--batch-size", "64"])):
                out = os.path.join(tmp, f"store_{w}_{len(rows)}")
                r = run(["--out", out, "--epochs", str(args.epochs), "--workers", str(w), "--device", "cpu", *extra])
                rows.append({"case": label, "workers": w, **r})
                print(rows[-1], flush=True)
    lines = [f"save-logits on {os.cpu_count()} CPU cores ({time.strftime('%Y-%m-%d')}; last of {args.epochs} epochs)",
             "", "| case | workers | images | epoch s | img/s | waiting for data | bound |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['workers']} | {r['records']} | {r['epoch_s']:.1f} | {r['img_s']} | "
                     f"{r['wait_s']:.1f} s ({r['wait_pct']}%) | {r['bound']} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
