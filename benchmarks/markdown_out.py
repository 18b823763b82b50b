"""The benchmarks' one way to hand a markdown report over: printed, and appended to (or written
as) a file when one is named; the environment line of the CPU reports; and a way to still hand a
report over when a step's time limit strikes."""
from __future__ import annotations

import datetime
import os
import platform
import signal
import sys


def emit(text: str, path: str | None, append: bool = True) -> None:
    print(text)
    if path:
        with open(path, "a" if append else "w") as f:
            f.write(text)


def cpu_env() -> str:
    """Date, CPU, threads, torch and the instruction set the CPU kernels run (and a forced one)."""
    import torch

    import vitfast

    isa = vitfast.build_info().get("cpu_isa", "?")
    if os.environ.get("VITFAST_CPU_ISA"):
        isa += f", VITFAST_CPU_ISA={os.environ['VITFAST_CPU_ISA']}"
    threads = torch.get_num_threads()
    return (f"{datetime.date.today()}, CPU {platform.machine()} {platform.processor() or ''}".strip()
            + f", {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}, kernels' ISA {isa}")


def exit_on_sigterm() -> None:
    """scripts/gpu_check.sh stops a step at its limit with timeout(1): SIGTERM, then SIGKILL 10 s
    later. Leave through SystemExit(124) instead, so that the caller's `finally` writes the report
    of what was measured (a signal is handled once the main thread is back in Python)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(124))
