"""Every vitfast kernel once at its bar shape, for Nsight Compute (scripts/gpu_check.sh, step 5):
warm-up outside the profiled range, then one forward (+ backward) per op between
cudaProfilerStart/Stop, so `ncu --profile-from-start off` records exactly these launches.

    ncu --profile-from-start off --kernel-name-base demangled --kernel-name regex:vitfast ... \
        python benchmarks/ncu_cases.py
    python benchmarks/ncu_cases.py --match "head-split|streaming"     # a subset
    python benchmarks/ncu_cases.py --device cpu --small    # smoke test of this script
"""
from __future__ import annotations

import argparse
import re
import sys

import torch

from vitfast import head_mix_attention, sparse_soft_target_cross_entropy, topk_softmax, window_attention
from vitfast.ops.dense_soft_target_ce import dense_soft_target_ce_with_grad
from vitfast.ops import CovarianceAccumulator
from window_attention_cases import environ, forced_route, swin_index


def cases(device, small):
    """name -> zero-argument callable running the op (and its backward) at the bar's shape."""
    s = 16 if small else 1
    out = {}
    logits = torch.randn(1024 // s, 21841, device=device).half()
    out["topk_softmax B1024 C21841 k100 fp16"] = lambda: topk_softmax(logits, 100)
    v, i = topk_softmax(torch.randn(1024 // s, 21841, device=device), 100)
    x = torch.randn(1024 // s, 21841, device=device).bfloat16().requires_grad_()
    out["soft_target_ce B1024 C21841 k100 bf16 fwd+bwd"] = \
        lambda: torch.autograd.grad(sparse_soft_target_cross_entropy(x, v, i), x)
    # MiniViT's relation rows: one chunk of Mini-DeiT-S (48 windows x 9 x 197 rows of 197), bf16
    rs = torch.randn(48 * 9 * 197 // s, 197, device=device).bfloat16()
    rt = torch.randn(48 * 9 * 197 // s, 197, device=device).bfloat16()
    out["dense_soft_target_ce relations R85104 C197 bf16 loss+grad"] = \
        lambda: dense_soft_target_ce_with_grad(rs, rt, 0.051, 0.051)
    # one 4096-row chunk of the n65536 bar: the bar's update is 16 such launches of each kernel,
    # and ncu replays every launch ~20 times (the whole bar ran past the step's 90 s on the H100)
    y = torch.randn(4096 // s, 3072 // s, device=device) + 100
    for route in ("split_gemm", "tensor_core"):
        acc = CovarianceAccumulator(y.shape[1], device, method=route if device.type == "cuda" else "auto")
        out[f"covariance n4096 (one chunk) m3072 fp32 {route}"] = lambda acc=acc: acc.update(y)
    qkv = torch.randn(8192 // s, 49, 288, device=device).bfloat16().requires_grad_()
    table = torch.randn(3, 169, device=device).requires_grad_()
    index = swin_index(7, 7, device)
    mask = torch.where(torch.rand(64, 49, 49, device=device) < 0.5, -100.0, 0.0)
    out["window_attention swin_t stage1 bf16 fwd+bwd"] = lambda: torch.autograd.grad(
        window_attention(qkv, 3, 32, bias_table=table, bias_index=index, mask=mask).float().sum(), (qkv, table))

    def tiles():  # the same call on the shared-memory-tile kernels (the register kernels' predecessor)
        with forced_route("tiles"):
            torch.autograd.grad(window_attention(qkv, 3, 32, bias_table=table, bias_index=index,
                                                 mask=mask).float().sum(), (qkv, table))
    out["window_attention swin_t stage1 bf16 fwd+bwd (tile kernels)"] = tiles
    seq = torch.randn(128 // s, 197, 3 * 384, device=device).bfloat16().requires_grad_()
    mix = [(torch.eye(6, device=device) + 0.1 * torch.randn(6, 6, device=device)).requires_grad_() for _ in range(2)]
    bias = torch.zeros(6, device=device, requires_grad=True)
    mix3 = [(torch.eye(3, device=device) + 0.1 * torch.randn(3, 3, device=device)).requires_grad_() for _ in range(2)]
    for impl in ("fused", "sdpa"):  # the SDPA route's kernels are not vitfast's: kernel_times.py splits them
        tag = "" if impl == "fused" else " impl=sdpa"
        out[f"head_mix_attention B128 H6 N197 d64 bf16 fwd+bwd{tag}"] = lambda impl=impl: torch.autograd.grad(
            head_mix_attention(seq, 6, 64, pre_mix=mix[0], post_mix=mix[1], post_mix_bias=bias,
                               impl=impl).float().sum(), [seq, *mix, bias])
        out[f"head_mix_attention mini_swin_t stage1 bf16 fwd+bwd{tag}"] = lambda impl=impl: torch.autograd.grad(
            head_mix_attention(qkv, 3, 32, pre_mix=mix3[0], post_mix=mix3[1], bias_table=table, bias_index=index,
                               mask=mask, impl=impl).float().sum(), [qkv, table, *mix3])

    def mix_tiles():  # Mini-Swin-T stage 1 on the head-mix tile kernels (the register kernels' predecessor)
        with forced_route("tiles"):
            torch.autograd.grad(head_mix_attention(qkv, 3, 32, pre_mix=mix3[0], post_mix=mix3[1], bias_table=table,
                                                   bias_index=index, mask=mask).float().sum(), [qkv, table, *mix3])
    out["head_mix_attention mini_swin_t stage1 bf16 fwd+bwd (tile kernels)"] = mix_tiles

    def mix_no_pipeline():  # the register backward without its cp.async double buffering
        with environ("VITFAST_HEAD_MIX_PIPELINE", "0"):
            torch.autograd.grad(head_mix_attention(qkv, 3, 32, pre_mix=mix3[0], post_mix=mix3[1], bias_table=table,
                                                   bias_index=index, mask=mask).float().sum(), [qkv, table, *mix3])
    out["head_mix_attention mini_swin_t stage1 bf16 fwd+bwd (no cp.async pipeline)"] = mix_no_pipeline

    def deit_tile_backward():  # DeiT-S on the streaming forward and the tile backward it replaced
        with environ("VITFAST_HEAD_MIX_STREAM_BWD", "0"):
            torch.autograd.grad(head_mix_attention(seq, 6, 64, pre_mix=mix[0], post_mix=mix[1], post_mix_bias=bias,
                                                   impl="fused").float().sum(), [seq, *mix, bias])
    out["head_mix_attention B128 H6 N197 d64 bf16 fwd+bwd (tile backward)"] = deit_tile_backward
    # DeiT-B (12 heads of 64): the head-split backward (head_mix_split_bwd.cuh)
    seq12 = torch.randn(128 // s, 197, 3 * 768, device=device).bfloat16().requires_grad_()
    mix12b = [(torch.eye(12, device=device) + 0.1 * torch.randn(12, 12, device=device)).requires_grad_()
              for _ in range(2)]
    out["head_mix_attention B128 H12 N197 d64 bf16 fwd+bwd (head-split backward)"] = lambda: torch.autograd.grad(
        head_mix_attention(seq12, 12, 64, pre_mix=mix12b[0], post_mix=mix12b[1], impl="fused").float().sum(),
        [seq12, *mix12b])

    # the streaming forward (head_mix_stream.cuh) alone: DeiT-S inference (auto without gradients)
    # and Mini-Swin-T stage 3 (12 heads, table + shift mask)
    def deit_inference():
        with torch.no_grad():
            head_mix_attention(seq, 6, 64, pre_mix=mix[0], post_mix=mix[1], post_mix_bias=bias)
    out["head_mix_attention B128 H6 N197 d64 bf16 fwd (streaming, inference)"] = deit_inference
    qkv12 = torch.randn(512 // s, 49, 3 * 384, device=device).bfloat16()
    table12 = torch.randn(12, 169, device=device) * 0.02
    mask12 = torch.where(torch.rand(4, 49, 49, device=device) < 0.5, -100.0, 0.0)
    mix12 = [torch.eye(12, device=device) + 0.1 * torch.randn(12, 12, device=device) for _ in range(2)]

    def stage3_forward():
        with torch.no_grad():
            head_mix_attention(qkv12, 12, 32, pre_mix=mix12[0], post_mix=mix12[1], bias_table=table12,
                               bias_index=index, mask=mask12)
    out["head_mix_attention mini_swin_t stage3 bf16 fwd (streaming)"] = stage3_forward
    # Mini-Swin-T stage 2 (6 heads, table + shift mask): streaming forward and backward, the table
    # gradient summed per block (head_mix_stream_bwd.cuh)
    qkv6 = torch.randn(2048 // s, 49, 3 * 192, device=device).bfloat16().requires_grad_()
    table6 = (torch.randn(6, 169, device=device) * 0.02).requires_grad_()
    mask6 = torch.where(torch.rand(16, 49, 49, device=device) < 0.5, -100.0, 0.0)
    out["head_mix_attention mini_swin_t stage2 bf16 fwd+bwd (streaming)"] = lambda: torch.autograd.grad(
        head_mix_attention(qkv6, 6, 32, pre_mix=mix[0], post_mix=mix[1], bias_table=table6, bias_index=index,
                           mask=mask6).float().sum(), [qkv6, table6, *mix])
    # stage 3 (12 heads of 32): the streaming backward by 8-key halves, mixing gradients in passes
    qkv12g = qkv12.detach().requires_grad_()
    table12g = table12.detach().requires_grad_()
    mix12g = [m.detach().requires_grad_() for m in mix12]
    out["head_mix_attention mini_swin_t stage3 bf16 fwd+bwd (streaming)"] = lambda: torch.autograd.grad(
        head_mix_attention(qkv12g, 12, 32, pre_mix=mix12g[0], post_mix=mix12g[1], bias_table=table12g,
                           bias_index=index, mask=mask12).float().sum(), [qkv12g, table12g, *mix12g])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="shapes divided by 16 (smoke test)")
    ap.add_argument("--match", metavar="REGEX", help="only the cases whose names this regex finds (re.search)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    todo = cases(device, args.small)
    if args.match:
        todo = {name: fn for name, fn in todo.items() if re.search(args.match, name)}
        if not todo:
            ap.error(f"--match {args.match!r}: no case matches")
    for fn in todo.values():  # warm-up: autotuning, allocations, lazy module loads
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for name, fn in todo.items():
        if device.type == "cuda":
            torch.cuda.nvtx.range_push(name)
        fn()
        if device.type == "cuda":
            torch.cuda.nvtx.range_pop()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("profiled: " + "; ".join(todo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
