"""The native head_mix_attention ops called directly with a shape whose fused kernels do not fit
one block's shared memory (float32, 20 heads: no backward configuration on an H100) must raise a
ValueError that names num_heads. The first H100 run crashed the process (SIGSEGV) there instead;
scripts/gpu_check.sh runs this under cuda-gdb to get the native backtrace if it still does.

    python scripts/head_mix_nofit_check.py        # exit 0: clean error (or the shape fits here)
"""
import sys

import torch

import vitfast  # noqa: F401  (registers torch.ops.vitfast)
from vitfast import _ext
from vitfast.ops import qkv_layout


def main() -> int:
    heads, dk = 20, 16
    fwd_fits, bwd_fits = _ext.head_mix_fits(torch.device("cuda"), torch.float32, heads, dk, dk, True, False)
    print(f"planner: forward fits {fwd_fits}, backward fits {bwd_fits}", flush=True)
    qkv = torch.randn(2, 16, 3 * heads * dk, device="cuda")
    offsets, hs = qkv_layout("swin", heads, dk, dk)
    mix = torch.eye(heads, device="cuda")
    args = (qkv, None, None, None, mix, None, mix, None, heads, dk, dk, offsets, hs, dk ** -0.5, [], [])
    if not fwd_fits:
        try:
            torch.ops.vitfast.head_mix_attention_forward(*args)
        except ValueError as e:
            print("forward: clean ValueError:", str(e)[:200], flush=True)
        return 0
    out, lse = torch.ops.vitfast.head_mix_attention_forward(*args)
    torch.cuda.synchronize()
    print("forward ran", flush=True)
    try:
        torch.ops.vitfast.head_mix_attention_backward(torch.randn_like(out), *args[:1], lse, *args[1:], False, True)
        torch.cuda.synchronize()
        print("backward ran (fits: %s)" % bwd_fits, flush=True)
        return 0 if bwd_fits else 1
    except ValueError as e:
        print("backward: clean ValueError:", str(e)[:300], flush=True)
        return 0 if "num_heads" in str(e) else 1


if __name__ == "__main__":
    sys.exit(main())
