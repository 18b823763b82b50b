"""The benchmarks' one way to hand a markdown report over: printed, and appended to (or written
as) a file when one is named; and a way to still hand a report over when a step's time limit
strikes."""
from __future__ import annotations

import signal
import sys


def emit(text: str, path: str | None, append: bool = True) -> None:
    print(text)
    if path:
        with open(path, "a" if append else "w") as f:
            f.write(text)


def exit_on_sigterm() -> None:
    """scripts/gpu_check.sh stops a step at its limit with timeout(1): SIGTERM, then SIGKILL 10 s
    later. Leave through SystemExit(124) instead, so that the caller's `finally` writes the report
    of what was measured (a signal is handled once the main thread is back in Python)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(124))
