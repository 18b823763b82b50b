"""Progress bars for every pipeline. On a terminal or in a notebook: tqdm's bar. Where stderr is
not a terminal (nohup, a batch job's log, a CI log): a plain line every 30 s and one at the end
for a loop that runs longer than that (none for a shorter one), instead of a bar redrawn ten
times a second behind carriage returns that fills the log file with one endless line.

VITFAST_PROGRESS=bar|lines|off overrides the choice (an IDE console that is not a TTY but draws
bars: `bar`); VITFAST_PROGRESS_INTERVAL sets the seconds between lines."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

from .errors import UserError

MODE_ENV = "VITFAST_PROGRESS"
INTERVAL_ENV = "VITFAST_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
MODES = ("bar", "lines", "off")


def _notebook() -> bool:
    # tqdm.auto picks its notebook widget inside a Jupyter kernel, whose stderr is no TTY either
    return any(c.__name__ == "tqdm_notebook" for c in auto_tqdm.__mro__)


def mode(stream=None) -> str:
    """'bar', 'lines' or 'off': VITFAST_PROGRESS if set, else 'bar' on a terminal or in a
    notebook and 'lines' otherwise."""
    value = os.environ.get(MODE_ENV, "").strip().lower()
    if value:
        if value not in MODES:
            raise UserError(f"environment variable {MODE_ENV} must be one of {', '.join(MODES)}, got {value!r}")
        return value
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "bar" if _notebook() or (isatty is not None and isatty()) else "lines"


def interval_s() -> float:
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"environment variable {INTERVAL_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def check_environment() -> None:
    """Raise the UserError a bad VITFAST_PROGRESS or VITFAST_PROGRESS_INTERVAL would raise later."""
    mode()
    interval_s()


class LineStream:
    """A text stream for tqdm that writes each redraw as a line of its own: tqdm starts a redraw
    with a carriage return and pads it with spaces; blank redraws (a bar cleared) and redraws
    that only update the clock (the final one at close) are dropped."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        for part in text.replace("\n", "\r").split("\r"):
            part = part.rstrip()
            count = part.rsplit("[", 1)[0]  # "desc: 40%|####      | 4/10 " without "[elapsed<left, rate]"
            if part and count != self.last:
                self.stream.write(part + "\n")
                self.last = count

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # encoding, isatty, fileno...: the wrapped stream's
        return getattr(self.stream, name)


def progress(iterable=None, *, total: int | None = None, desc: str | None = None, enabled: bool = True,
             stream=None, **kwargs):
    """A tqdm progress bar over `iterable` (or one to update() by hand), drawn as `mode()` says.

    The bar iterates over `iter(iterable)`, taken once: tqdm.auto's bar calls iter() in its
    constructor and again to loop, and a DataLoader's second iterator starts a second set of
    workers."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    source = iter(iterable) if iterable is not None else None
    how = mode(stream) if enabled else "off"
    if how == "off":
        return std_tqdm(source, total=total, desc=desc, disable=True, **kwargs)
    if how == "bar":
        return auto_tqdm(source, total=total, desc=desc, file=stream, **kwargs)
    seconds = interval_s()
    # delay: a loop shorter than the interval leaves no line (the pipelines log each epoch and
    # stage); leave=True: a longer one ends with a line that says where it ended; ascii: no block
    # characters in a log file
    kwargs.update(delay=seconds, leave=True, ascii=True, mininterval=seconds, maxinterval=seconds,
                  dynamic_ncols=False)
    return std_tqdm(source, total=total, desc=desc, file=LineStream(sys.stderr if stream is None else stream),
                    **kwargs)
