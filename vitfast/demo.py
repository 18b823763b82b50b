"""`vitfast demo`: the two TinyViT ops end to end on one device, checked against the references
and timed against the plain PyTorch way of doing the same thing.

1. A teacher's logits (peaked like a trained classifier's) are compressed to top-k probabilities,
   the record TinyViT stores per sample and epoch.
2. A student's loss and gradient against the sparse target come from the fused op, and are
   compared with the dense-target computation.
"""
from __future__ import annotations

import torch

from . import _ext
from .ops import reference, sparse_soft_target_cross_entropy, topk_softmax
from .timing import time_ms


def teacher_like_logits(batch: int, classes: int, device, dtype, gen: torch.Generator) -> torch.Tensor:
    """Logits with a few confident classes per row over a broad tail, like a trained teacher's."""
    x = torch.randn(batch, classes, generator=gen, device=device) * 2.0
    hot = torch.randint(0, classes, (batch, 5), generator=gen, device=device)
    x.scatter_add_(1, hot, 8.0 + 4.0 * torch.rand(batch, 5, generator=gen, device=device))
    return x.to(dtype)


def run_demo(args) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    b, c, k = args.batch, args.classes, args.k
    print(f"vitfast demo on {device} ({'native kernels' if _ext.native(device) else 'reference fallback'}): "
          f"batch {b}, {c} classes, top-{k}, {args.dtype} logits")

    teacher = teacher_like_logits(b, c, device, dtype, gen)
    values, indices = topk_softmax(teacher, k)
    ref_v, ref_i = reference.topk_softmax_reference(teacher, k)
    p_full = torch.softmax(teacher.double(), -1)
    sparse = reference.sparse_soft_target_dense(values, indices, c)
    kl = (p_full * (p_full.clamp_min(1e-300).log() - sparse.clamp_min(1e-300).log())).sum(-1).mean().item()
    record = 4 + k * (indices.element_size() + values.element_size())
    print(f"  store record: {record} B per sample-epoch (seed + {indices.dtype} indices + {values.dtype} values) "
          f"vs {c * 2} B for dense fp16 logits")
    print(f"  top-{k} keeps {values.float().sum(-1).mean().item():.4f} of the teacher's mass; "
          f"KL(teacher || sparse target) = {kl:.3e}")
    print(f"  vs reference: indices identical {bool(torch.equal(indices, ref_i))}, "
          f"max |value error| {(values.double() - ref_v.double()).abs().max().item():.2e}")

    student = (torch.randn(b, c, generator=gen, device=device) * 2.0).to(dtype).requires_grad_()
    loss = sparse_soft_target_cross_entropy(student, values, indices, c)
    (grad,) = torch.autograd.grad(loss, student)
    s64 = student.detach().double().requires_grad_()
    ref_loss = reference.sparse_soft_target_cross_entropy_reference(s64, values, indices, c)
    (ref_grad,) = torch.autograd.grad(ref_loss, s64)
    print(f"  student loss {loss.item():.5f} (float64 dense reference {ref_loss.item():.5f}); "
          f"max |grad error| {(grad.double() - ref_grad).abs().max().item():.2e}")

    def baseline_topk():
        return torch.softmax(teacher.float(), -1).topk(k)

    def baseline_ce():
        x = student.detach().requires_grad_()
        target = reference.sparse_soft_target_dense(values, indices, c, torch.float32)
        torch.autograd.grad(-(target * torch.log_softmax(x.float(), -1)).sum(-1).mean(), x)

    def fused_ce():
        x = student.detach().requires_grad_()
        torch.autograd.grad(sparse_soft_target_cross_entropy(x, values, indices, c), x)

    reps = 20 if device.type == "cuda" else 3
    rows = [
        ("top-k softmax", time_ms(lambda: topk_softmax(teacher, k), device, 3, reps),
         time_ms(baseline_topk, device, 3, reps), "softmax(float) + topk"),
        ("soft-target CE fwd+bwd", time_ms(fused_ce, device, 3, reps), time_ms(baseline_ce, device, 3, reps),
         "dense target + log_softmax"),
    ]
    print(f"  {'op':<24}{'vitfast ms':>12}{'baseline ms':>13}{'speed-up':>10}  baseline")
    for name, ours, base, what in rows:
        print(f"  {name:<24}{ours:>12.3f}{base:>13.3f}{base / ours:>9.2f}x  {what}")
    if device.type == "cpu":
        print("  (CPU timings; the GPU numbers are in benchmarks/RESULTS.md)")
    return 0
