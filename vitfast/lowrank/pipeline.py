"""The AAFM + GFM pipeline: collect -> PCA -> sensitivity search -> greedy ranks -> AFM ->
GFM -> save + report, with the weight-SVD baseline at the same structure for comparison."""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .. import distributed as vdist
from ..engine import folder_lock
from .aafm import LayerChoice, apply_structure, greedy_allocation, sensitivities
from .block_cache import SearchRunner
from .checkpoint import save_compressed
from .gfm import gfm_finetune
from .layers import linear_layers
from .outputs import resolve_output
from .report import count_macs, count_params, evaluate, outputs_of, plot_energy_and_ranks, throughput
from .stats import collect_linear_stats, dims_for_energy, num_samples, pca, take, to_device
from .tokens import resolve_token_mask


@dataclass
class LowRankConfig:
    target_params: float = 0.67      # fraction of the model's parameters to keep (or a count if > 1)
    rank_step: int = 32
    batch_size: int = 64
    gfm_epochs: int = 30
    gfm_lr: float = 5e-4
    gfm_weight_decay: float = 0.01
    damping: float = 1e-8
    memory_budget_mb: float | None = None
    compare_svd: bool = True
    device: str = "cpu"
    amp_dtype: str = "bfloat16"      # autocast on CUDA for every stage ("float32": off; CPU runs float32)
    compile: bool = False            # torch.compile the student for GFM's training steps
    gfm_checkpoint_every: int = 0    # GFM also checkpoints every N steps (0: at epoch ends only)
    seed: int = 0
    progress: bool = True
    # what counts and what to reproduce (see lowrank.tokens / lowrank.outputs): padding never
    # enters statistics or losses; any model, not only timm classifiers
    token_mask: object = "auto"      # "auto" (attention_mask of dict inputs), None, or batch -> (B, N) bool
    output: object = "auto"          # the sensitivity's output: "auto" | "logits" | "tokens" | "pooled" | fn
    features: object = "auto"        # GFM's target: "auto" (= "tokens") | "logits" | "pooled" | fn
    blocks: object = None            # the repeated blocks (modules or names); None: found automatically
    search_batch: int | None = None  # samples per search forward (batch_size x candidate ranks run together);
    #                                  None: batch_size on CPU (measured: no gain there), 1024 on CUDA

    def validate(self) -> None:
        """Every argument, before any work (UserError names the command-line option)."""
        from ..errors import UserError

        t = self.target_params
        if not (t > 0 and (t < 1 or float(t).is_integer())):
            raise UserError(f"argument --target-params must be a fraction in (0, 1) or a whole number of parameters, "
                            f"got {t}")
        if self.search_batch is not None and self.search_batch < 1:
            raise UserError(f"argument --search-batch must be >= 1, got {self.search_batch}")
        for name, low, option in (("rank_step", 1, None), ("batch_size", 1, None), ("gfm_epochs", 1, None),
                                  ("gfm_checkpoint_every", 0, "checkpoint-every")):
            if getattr(self, name) < low:
                raise UserError(f"argument --{option or name.replace('_', '-')} must be >= {low}, got "
                                f"{getattr(self, name)}")
        from ..engine.trainer import amp_name

        amp_name(self.amp_dtype)  # raises UserError naming --amp-dtype
        if not self.gfm_lr > 0:
            raise UserError(f"argument --gfm-lr must be > 0, got {self.gfm_lr}")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise UserError(f"argument --memory-budget-mb must be > 0, got {self.memory_budget_mb}")
        from .outputs import SPECS
        from .tokens import resolve_token_mask

        for name in ("output", "features"):
            spec = getattr(self, name)
            if not (callable(spec) or spec in SPECS):
                raise ValueError(f"lowrank: argument '{name}': an output must be one of {SPECS} or a function "
                                 f"(model, batch) -> tensor, got {spec!r}")
        resolve_token_mask(self.token_mask)  # raises for anything else


def smallest_reachable(model: nn.Module, layers: dict, rank_step: int) -> int:
    """The fewest parameters any allocation can reach: every compressible layer at its smallest
    candidate rank."""
    from .aafm import candidate_ranks
    from .layers import LowRankLinear

    total = count_params(model)
    for lin in layers.values():
        ranks = candidate_ranks(lin, rank_step)
        if ranks:
            full = lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)
            total -= full - LowRankLinear.params_for(lin.in_features, lin.out_features, ranks[0], lin.bias is not None)
    return total


def _target_count(total: int, target: float, floor: int | None = None) -> int:
    from ..errors import UserError

    count = int(target * total) if target < 1 else int(target)
    if count >= total:
        raise UserError(f"argument --target-params asks for {count:,} parameters, not fewer than the model's {total:,}")
    if floor is not None and count < floor:
        raise UserError(f"argument --target-params asks for {count:,} parameters; the fewest this model can reach with "
                        f"--rank-step is {floor:,} ({floor / total:.1%})")
    return count


@folder_lock.holds_output("out_dir", "output folder")
def run_lowrank(model: nn.Module, proxy, cfg: LowRankConfig, out_dir: str, base_model: str, model_kwargs=None,
                eval_inputs=None, eval_labels=None, log=print, eval_what: str | None = None) -> dict:
    """Compress `model` (left untouched) using the unlabeled `proxy` inputs; write the compressed
    checkpoint, structure, report and plots to out_dir; return the report.

    `eval_inputs` (optional, with `eval_labels`): held-out inputs for the report, as tensors, or a
    zero-argument function giving (inputs, labels) batches -- a DataLoader over an ImageFolder,
    streamed, memory bounded whatever its size (the CLI's --eval-data). `eval_what`: what they are,
    for the report (default "held-out inputs"; the CLI names the folder and any overlap with the
    proxy set's).

    Under torchrun every rank calls this with the same inputs: collection is sharded across ranks
    and merged, the sensitivity search is split by layer, GFM runs in DDP; rank 0 writes, and holds
    out_dir while it runs (engine.folder_lock: a second process on it is refused, naming it)."""
    cfg.validate()
    rank, world = vdist.rank_world()
    if rank != 0:
        log = lambda *_: None  # noqa: E731
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    original = model.to(device).eval()
    times = {}
    t0 = time.time()
    layers = linear_layers(original)
    if not layers:
        raise ValueError("lowrank: the model has no nn.Linear layers to compress")
    total = count_params(original)
    target = _target_count(total, cfg.target_params, smallest_reachable(original, layers, cfg.rank_step))
    log(f"model {base_model}: {total:,} parameters, {len(layers)} linear layers; target {target:,} "
        f"({target / total:.0%})")

    # 1. statistics of every layer's outputs (and inputs, for the energy plot) in one pass
    shard = take(proxy, slice(rank, None, world)) if world > 1 else proxy
    outs, ins = collect_linear_stats(original, shard, layers, cfg.batch_size, device, with_inputs=True,
                                     memory_budget_mb=cfg.memory_budget_mb, amp=cfg.amp_dtype, progress=cfg.progress,
                                     token_mask=cfg.token_mask)
    times["collect_s"] = time.time() - t0
    bases, means, energy_rows = {}, {}, []
    for name, lin in layers.items():
        vals, vecs = pca(outs[name], cfg.damping)
        bases[name], means[name] = vecs, outs[name].mean
        in_vals, _ = pca(ins[name], cfg.damping)
        sv = torch.linalg.svdvals(lin.weight.detach().double())
        energy_rows.append({"name": name, "full_out": lin.out_features, "full_in": lin.in_features,
                            "full_min": min(lin.in_features, lin.out_features),
                            "out_dims90": dims_for_energy(vals), "in_dims90": dims_for_energy(in_vals),
                            "weight_dims90": dims_for_energy(sv.pow(2))})
    del ins

    # 2. sensitivity of each layer at each rank, then greedy ranks under the budget
    search_path = os.path.join(out_dir, "search.json")
    # the search depends on the weights and the proxy data themselves, not just their names and sizes
    mask_fn = resolve_token_mask(cfg.token_mask)
    output_fn, is_logits = resolve_output(cfg.output, original, to_device(take(proxy, slice(0, 1)), device))
    key = {"base_model": base_model, "rank_step": cfg.rank_step, "proxy": int(_n(proxy)), "seed": cfg.seed,
           "weights": weights_digest(original), "proxy_digest": inputs_digest(proxy),
           "output": _spec_name(cfg.output), "token_mask": _spec_name(cfg.token_mask)}
    t1 = time.time()
    choices = _load_search(search_path, key)
    vdist.barrier()  # every rank has read search.json before rank 0 may rewrite it
    if choices is None:
        search_batch = cfg.search_batch or (1024 if device.type == "cuda" else cfg.batch_size)
        runner = SearchRunner(original, proxy, cfg.batch_size, device, cfg.amp_dtype, output_fn, is_logits, mask_fn,
                              cfg.blocks, search_batch)
        if rank == 0 and not runner.blockwise:
            log("AAFM: no repeated blocks found (give LowRankConfig.blocks): every candidate re-runs the whole model")
        mine = {n: lin for i, (n, lin) in enumerate(layers.items()) if i % world == rank}
        found = sensitivities(original, runner, mine, bases, means, cfg.rank_step, cfg.progress and rank == 0)
        del runner
        by_name = {c.name: c for part in vdist.all_gather_objects(found) for c in part}
        choices = [by_name[n] for n in layers]
        if rank == 0:
            from ..engine.checkpoint import atomic_write_json

            atomic_write_json(search_path, {"key": key, "layers": [asdict(c) for c in choices]})
    else:
        log("AAFM: reusing the sensitivity search in search.json")
    times["search_s"] = time.time() - t1
    ranks = greedy_allocation(choices, total - sum(c.full_params for c in choices), target)

    # 3. build AFM and (same structure) SVD models, fine-tune both with GFM
    variants = {"aafm": apply_structure(copy.deepcopy(original), ranks, "afm", bases, means)}
    if cfg.compare_svd:
        variants["svd"] = apply_structure(copy.deepcopy(original), ranks, "svd")
    eval_x = eval_inputs if eval_inputs is not None else proxy
    if callable(eval_x):  # a streamed evaluation set: labels come with its batches
        from .report import labels_of

        eval_labels = labels_of(eval_x, eval_labels)
    measure = dict(output_fn=output_fn, is_logits=is_logits, mask_fn=mask_fn)
    reference = outputs_of(original, eval_x, cfg.batch_size, device, cfg.amp_dtype, output_fn, mask_fn)
    example = next(iter(eval_x()))[0] if callable(eval_x) else take(eval_x, slice(0, min(cfg.batch_size, _n(eval_x))))
    results = {"original": _measure(original, eval_x, eval_labels, reference, example, cfg, device, measure)}
    for vname, vmodel in variants.items():
        results[f"{vname}"] = _measure(vmodel, eval_x, eval_labels, reference, example, cfg, device, measure)
    t2 = time.time()
    for vname, vmodel in variants.items():
        log(f"GFM ({vname}): {cfg.gfm_epochs} epochs on {_n(proxy)} unlabeled inputs")
        hist = gfm_finetune(vmodel, original, proxy, cfg.gfm_epochs, cfg.gfm_lr, cfg.batch_size, cfg.gfm_weight_decay,
                            device=device, amp=cfg.amp_dtype, checkpoint_dir=os.path.join(out_dir, f"gfm_{vname}"),
                            seed=cfg.seed, progress=cfg.progress, log=log, features=cfg.features,
                            token_mask=cfg.token_mask, compile=cfg.compile, checkpoint_every=cfg.gfm_checkpoint_every)
        results[f"{vname}+gfm"] = _measure(vmodel, eval_x, eval_labels, reference, example, cfg, device, measure)
        results[f"{vname}+gfm"]["gfm_final_mse"] = hist[-1] if hist else None
    times["gfm_s"] = time.time() - t2
    report = {"base_model": base_model, "target_params": target, "original_params": total, "ranks": ranks,
              "results": results, "energy": energy_rows, "times": times,
              "config": {f.name: _spec_name(getattr(cfg, f.name)) for f in fields(cfg)}, "world_size": world,
              "measured_on": (eval_what or "held-out inputs") if eval_inputs is not None else
              "the proxy inputs GFM trained on (no held-out set given)"}
    if rank != 0:
        vdist.barrier()
        return report

    # 4. outputs
    chosen = {c.name: {"rank": ranks.get(c.name), "full_out": c.out_features, "in": c.in_features,
                       "sensitivity": c.sensitivity} for c in choices}
    save_compressed(variants["aafm"], os.path.join(out_dir, "compressed"), base_model, ranks, model_kwargs,
                    extra={"target_params": target, "params": count_params(variants["aafm"]), "layer_search": chosen})
    for row in energy_rows:
        row["rank"] = ranks.get(row["name"])
    report["plot"] = plot_energy_and_ranks(energy_rows, os.path.join(out_dir, "energy_and_ranks.png"))
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown_table(report))
    vdist.barrier()
    return report


def weights_digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def inputs_digest(inputs) -> str:
    import hashlib

    h = hashlib.sha256()
    tensors = inputs.values() if isinstance(inputs, dict) else [inputs]
    for t in tensors:
        if torch.is_tensor(t):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _n(inputs) -> int:
    from .stats import num_samples

    return num_samples(inputs)


def _load_search(path, key) -> list[LayerChoice] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError:  # torn by a crash mid-write (before writes were atomic): search again
        return None
    if data.get("key") != key:
        return None
    out = []
    for c in data["layers"]:
        c["sensitivity"] = {int(k): v for k, v in c["sensitivity"].items()}
        out.append(LayerChoice(**c))
    return out


def _spec_name(spec):
    """A JSON-able name for a config value that may be a function or modules."""
    if callable(spec) and not isinstance(spec, type):
        return f"function {getattr(spec, '__qualname__', type(spec).__name__)}"
    if isinstance(spec, (list, tuple)):
        return [s if isinstance(s, (str, int, float)) else type(s).__name__ for s in spec]
    return spec


def _measure(model, eval_x, eval_labels, reference, example, cfg, device, measure) -> dict:
    res = evaluate(model, eval_x, eval_labels, reference, cfg.batch_size, device, cfg.amp_dtype, **measure)
    res["params"] = count_params(model)
    res["macs"] = count_macs(model, example[:1]) if torch.is_tensor(example) else None
    res["images_per_s"] = throughput(model, example, device, cfg.amp_dtype) if torch.is_tensor(example) else None
    return res


def markdown_table(report: dict) -> str:
    logits = "kl_to_original" in report["results"]["original"]
    d1, d2 = ("KL to original", "accuracy") if logits else ("rel. error to original", "cosine to original")
    rows = [f"| model | params | MACs / image | images/s | {d1} | {d2} |", "|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        if logits:
            first = f"{r['kl_to_original']:.2e}"
            second = f"{r['accuracy'] * 100:.2f}%" if "accuracy" in r else "n/a"
        else:
            first, second = f"{r['rel_error_to_original']:.2e}", f"{r['cosine_to_original']:.4f}"
        macs = f"{r['macs'] / 1e6:.2f} M" if r.get("macs") else "n/a"
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "n/a"
        rows.append(f"| {name} | {r['params']:,} ({r['params'] / report['original_params']:.1%}) | {macs} | {ips} | "
                    f"{first} | {second} |")
    ranks = ", ".join(f"{k}: {v}" for k, v in report["ranks"].items())
    return (f"# Low-rank compression of {report['base_model']}\n\nTarget: {report['target_params']:,} parameters "
            f"of {report['original_params']:,}. Measured on {report['measured_on']}.\n\n" + "\n".join(rows) +
            f"\n\nRanks chosen by AAFM: {ranks}\n\nTimes (s): " +
            ", ".join(f"{k} {v:.1f}" for k, v in report["times"].items()) + "\n\n![energy and ranks](energy_and_ranks.png)\n")
