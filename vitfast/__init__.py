"""vitfast: fused CUDA kernels and pipelines that make vision transformers small and fast to train."""
import sys as _sys


def _the_command() -> bool:
    """Whether this import is the `vitfast` command's own (its console script, or `python -m
    vitfast`) rather than a program's."""
    import os

    main = getattr(_sys.modules.get("__main__"), "__file__", None) or ""
    argv = list(getattr(_sys, "orig_argv", []))
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    # while `python -m` imports its module's package, argv[0] is "-m"
    return os.path.basename(main) == "vitfast" or _sys.argv[:1] == ["-m"] and module.split(".")[0] == "vitfast"


try:  # torch loads here, for seconds: a Ctrl-C meanwhile ends the command in one line, as later
    from ._ext import build_info, cuda_kernels_built, extension_loaded
    from .ops import (dense_soft_target_cross_entropy, head_mix_attention, sparse_soft_target_cross_entropy,
                      topk_softmax, window_attention)
    from .patching import patch, patchable, patched_modules, register_patch, unpatch
except KeyboardInterrupt:
    if not _the_command():
        raise
    _sys.stderr.write("vitfast: interrupted\n")
    raise SystemExit(130) from None


def load_compressed(path: str, device="cpu"):
    """Rebuild a model compressed by `vitfast lowrank` (see vitfast.lowrank)."""
    from .lowrank import load_compressed as _load

    return _load(path, device)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_info",
    "cuda_kernels_built",
    "extension_loaded",
    "load_compressed",
    "patch",
    "patchable",
    "patched_modules",
    "register_patch",
    "unpatch",
    "window_attention",
    "head_mix_attention",
    "sparse_soft_target_cross_entropy",
    "dense_soft_target_cross_entropy",
    "topk_softmax",
]
