"""The benchmarks' one way to hand a markdown report over: printed, and appended to (or written
as) a file when one is named."""
from __future__ import annotations


def emit(text: str, path: str | None, append: bool = True) -> None:
    print(text)
    if path:
        with open(path, "a" if append else "w") as f:
            f.write(text)
