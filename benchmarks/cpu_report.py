"""What the CPU attention reports share: their options (--threads, --markdown, --quick), their
timing (medians in one process) and the environment line that heads each report."""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import torch

from vitfast.timing import time_ms

_quick = False


def cpu_options(doc: str, argv=None, add=None) -> argparse.Namespace:
    """Parses a report's options: its own (`add(parser)`) and the shared ones; sets torch's thread
    count and seeds it with 0, so that every run times the same inputs."""
    global _quick
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's choice)")
    ap.add_argument("--markdown", help="write the report here too")
    ap.add_argument("--quick", action="store_true",
                    help="one warm-up and two repeats per timing: a smoke run of the script, not a measurement")
    if add is not None:
        add(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quick = args.quick
    torch.manual_seed(0)
    return args


def median_ms(fn, warmup: int = 3, reps: int = 15) -> float:
    """Median milliseconds of fn() on the CPU (one warm-up and two repeats under --quick)."""
    if _quick:
        warmup, reps = 1, 2
    return time_ms(fn, torch.device("cpu"), warmup, reps)


def cpu_env() -> str:
    """Date, CPU, threads, torch and the instruction set the CPU kernels run (and a forced one);
    a --quick run says so, since its numbers are not measurements."""
    import vitfast

    isa = vitfast.build_info().get("cpu_isa", "?")
    if os.environ.get("VITFAST_CPU_ISA"):
        isa += f", VITFAST_CPU_ISA={os.environ['VITFAST_CPU_ISA']}"
    threads = torch.get_num_threads()
    env = (f"{datetime.date.today()}, CPU {platform.machine()} {platform.processor() or ''}".strip()
           + f", {threads} thread{'s' if threads != 1 else ''}, torch {torch.__version__}, kernels' ISA {isa}")
    return env + (", --quick: smoke run, not a measurement" if _quick else "")
