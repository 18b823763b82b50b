"""GPU timings of the low-rank pipeline on deit_base_patch16_224 (timm): statistics collection
over 2,000 images at 224, the full AAFM search (every linear layer, ranks in multiples of 32),
and inference throughput of the compressed model against the original.

No pretrained weights or ImageNet are reachable here, so the model is randomly initialised and the
images are random: the shapes (and so the timings) are the real ones, the sensitivities are not.

    python benchmarks/lowrank_gpu.py --json lowrank_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import timm
import torch

from vitfast.lowrank import collect_linear_stats, linear_layers, pca
from vitfast.lowrank.aafm import apply_structure, greedy_allocation, sensitivities
from vitfast.lowrank.block_cache import SearchRunner
from vitfast.lowrank.outputs import _logits
from vitfast.lowrank.report import count_params, throughput


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="deit_base_patch16_224")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--target", type=float, default=0.67)
    ap.add_argument("--search-batch", type=int, default=1000, help="samples per search forward (ranks x batch)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("lowrank_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).to(dev).eval()
    images = torch.randn(args.images, 3, 224, 224, device=dev)
    layers = linear_layers(model)
    res = {"model": args.model, "images": args.images, "layers": len(layers), "params": count_params(model),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "complete": False}

    def save():  # after every stage: a step cut by its time limit keeps what was measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)

    collect_linear_stats(model, images[:args.batch_size], layers, args.batch_size, dev, progress=False)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs, _ = collect_linear_stats(model, images, layers, args.batch_size, dev, progress=False)
    torch.cuda.synchronize()
    res["collect_s"] = time.perf_counter() - t
    save()

    t = time.perf_counter()
    bases, means = {}, {}
    for name in layers:
        _, vecs = pca(outs[name])
        bases[name], means[name] = vecs, outs[name].mean
    torch.cuda.synchronize()
    res["eigh_s"] = time.perf_counter() - t

    t = time.perf_counter()
    runner = SearchRunner(model, images, args.batch_size, dev, True, _logits, True, lambda b: None,
                          search_batch=args.search_batch)
    choices = sensitivities(model, runner, layers, bases, means, 32, progress=False)
    torch.cuda.synchronize()
    res["search_s"] = time.perf_counter() - t
    res["evaluations"] = sum(len(c.ranks) for c in choices)
    res["ranks_per_forward"] = runner.replicas
    save()
    del runner

    total = count_params(model)
    ranks = greedy_allocation(choices, total - sum(c.full_params for c in choices), int(args.target * total))
    compressed = apply_structure(timm.create_model(args.model, pretrained=False).to(dev).eval(), ranks, "afm", bases, means)
    batch = images[:256]
    res["original_img_s"] = throughput(model, batch, dev)
    res["compressed_img_s"] = throughput(compressed, batch, dev)
    res["compressed_params"] = count_params(compressed)
    res["bars"] = {"collect < 15 s": res["collect_s"] < 15, "AAFM search < 600 s": res["search_s"] < 600}
    res["complete"] = True
    print(json.dumps(res, indent=2))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
