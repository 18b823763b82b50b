"""MiniViT reports: the ablation table (mean and spread over seeds), the initialisation comparison,
the single-run comparison with the original (parameters, MACs, accuracy, images/s), and the
training curves with the gradient norm (the paper's instability figure)."""
from __future__ import annotations

import statistics

import torch


def _pct(v) -> str:
    return f"{100 * v:.2f}"


def ablation_markdown(ab: dict) -> str:
    lines = [f"# MiniViT ablation on the embedded default ({ab['teacher']})", "",
             f"Held-out top-1 on {ab['eval_on']}; mean ± standard deviation over seeds {ab['seeds']} "
             "(per-seed values in brackets). Every Mini model starts from the teacher's weights "
             "(init `first`) and trains with the same schedule; only the components differ.", "",
             "| model | sharing | parameters | top-1 % | per seed |", "|---|---|---|---|---|"]
    for name, r in ab["rows"].items():
        acc = r["top1"]
        spread = f" ± {100 * statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        lines.append(f"| {name.split(' [')[0]} | {r['share']} | {r['params'] / 1e6:.3f} M | "
                     f"{100 * statistics.mean(acc):.2f}{spread} | {', '.join(_pct(a) for a in acc)} |")
    lines += ["", "Starting point (before any training), held-out top-1 %:", "",
              "| sharing | shared weights from the group's first layer | their mean |", "|---|---|---|"]
    for share in ab["shares"]:
        lines.append(f"| {share} | {_pct(ab['init'][f'{share}/first'])} | {_pct(ab['init'][f'{share}/mean'])} |")
    verdicts = []
    for share in ab["shares"]:
        full = statistics.mean(ab["rows"][f"+ relation distillation (full) [share {share}]"]["top1"])
        plain = statistics.mean(ab["rows"][f"sharing only [share {share}]"]["top1"])
        verdicts.append(f"sharing {share}: full method {_pct(full)}% vs weight sharing only {_pct(plain)}% "
                        f"({'+' if full >= plain else ''}{100 * (full - plain):.2f} points)")
    lines += ["", "Full method vs plain weight sharing: " + "; ".join(verdicts) + ".", "",
              "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def plot_curves(histories: dict, path: str, title: str) -> str:
    """histories: label -> engine history (per-epoch dicts); plots held-out top-1, training loss and
    the mean / max gradient norm per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        if hist and "eval_top1" in hist[0]:
            axes[0].plot(ep, [100 * h["eval_top1"] for h in hist], label=label)
        axes[1].plot(ep, [h["train_loss"] for h in hist], label=label)
        line, = axes[2].plot(ep, [h["train_grad_norm"] for h in hist], label=label)
        axes[2].plot(ep, [h["train_grad_norm_max"] for h in hist], ls=":", color=line.get_color())
    axes[0].set_ylabel("held-out top-1 %")
    axes[1].set_ylabel("training loss")
    axes[2].set_ylabel("gradient norm (mean; dotted: max)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def compare_models(original, mini, example: torch.Tensor, device, eval_fn=None) -> dict:
    """Parameters, MACs, images/s (and accuracy via eval_fn(model)) of the original and the Mini."""
    from ..engine.measure import count_macs, count_params, throughput

    out = {}
    for name, m in (("original", original), ("mini", mini)):
        m = m.to(device).eval()
        row = {"params": count_params(m), "macs": count_macs(m, example[:1].to(device)),
               "images_per_s": throughput(m, example, device)}
        if eval_fn is not None:
            row.update(eval_fn(m))
        out[name] = row
    return out


def single_markdown(report: dict) -> str:
    c = report["comparison"]
    lines = [f"# MiniViT: {report['teacher']} -> Mini (sharing {report['share']})", "",
             f"Groups of layers sharing weights: {report['groups']}; transforms: head mixing "
             f"{'on' if report['heads_mix'] else 'off'}, MLP transform {report['mlp_transform'] or 'off'}; "
             f"layer pairs for relations: {report['pairs'] or 'none'}; distilled from "
             f"{report.get('distilled_from') or 'the original'}.", "",
             "| model | parameters | MACs / image | images/s | top-1 % |", "|---|---|---|---|---|"]
    for name in ("original", "mini"):
        r = c[name]
        acc = _pct(r["top1"]) if r.get("top1") is not None else "n/a"
        lines.append(f"| {name} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e9:.3f} G | {r['images_per_s']:.0f} | {acc} |")
    lines += ["", f"Accuracy measured on {report['eval_on'] or 'nothing (no --eval-data given)'}.", "",
              "![training curves](training_curves.png)", ""]
    return "\n".join(lines)
