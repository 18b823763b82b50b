"""A run directory that knows what it is: the full configuration and the identity of its inputs
(model, checkpoint hash, data list hash), recorded when the run starts. Resuming into it with
anything else is refused with a one-line message that names the first difference and how to start
fresh, so stale state is never reported as new."""
from __future__ import annotations

import hashlib
import json
import os

from ..errors import UserError
from . import folder_lock
from .checkpoint import atomic_write_json

RUN_FILE = "run.json"


class ResumeMismatch(UserError):
    pass


def file_digest(path: str | None, what: str = "checkpoint") -> str | None:
    """sha256 of a file (a checkpoint), None without one; a missing file is a UserError naming it
    (the run record is written before the model is loaded)."""
    if not path:
        return None
    if not os.path.exists(path) or os.path.isdir(path):
        raise UserError(f"{what} '{path}' " + ("is a folder, not a file" if os.path.isdir(path) else "does not exist"))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def folder_digest(root: str | None, legacy: bool = False) -> str | None:
    """Digest of an image folder's listing (relative paths and sizes): other data of the same size
    gets another digest, without reading every image. Hidden files and folders are skipped, as
    every reader skips them (vitfast.data.folders: a .DS_Store written by a file browser does not
    make the folder other data), and linked folders are followed, as the readers follow them.
    legacy=True: the digest of vitfast before that (every file, links not followed), which run
    records written then hold (RunDir(folders=...) accepts it)."""
    if not root:
        return None
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=not legacy):
        dirnames[:] = sorted(d for d in dirnames if legacy or not d.startswith("."))
        for name in sorted(filenames):
            if not legacy and name.startswith("."):
                continue
            p = os.path.join(dirpath, name)
            h.update(f"{os.path.relpath(p, root)}:{os.path.getsize(p)};".encode())
    return h.hexdigest()[:16]


def _first_difference(a, b, prefix=""):
    """(key, old, new) of the first difference of two run records, or None. A key the old record
    lacks matches an off value (None, False, 0, empty): an option added to vitfast since that run
    started, at its default, does not stop the run from resuming."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a and b[k] in (None, False, 0, "", [], {}):
                continue
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else (prefix[:-1], a, b)


# RunDirs whose run.json this process wrote (abandon_unsaved_runs); folder locks it holds
_started: list["RunDir"] = []
_locks: list[str] = []
_active: list["RunDir"] = []  # started or resumed by the last command (begin_command forgets them)
_dropped: list[str] = []  # folders whose records abandon_unsaved_runs removed, since begin_command
_entered = [0]  # depth of forgets_unsaved_runs_on_refusal calls


def abandon_unsaved_runs() -> None:
    """After an argument error found once the run had started: forget the runs this process started
    that saved nothing yet, so that the corrected command is not refused as another configuration.
    Under torchrun rank 0 alone removes files (every rank is refused, at once)."""
    if folder_lock.global_rank() != 0:
        _started.clear()
    while _started:
        run = _started.pop()
        if run.abandon_if_unsaved():
            _dropped.append(run.root)


def release_runs() -> None:
    """Ends this process's hold on the output folders it locked: another process may then resume
    them. The command line calls it when a command ends."""
    while _locks:
        folder_lock.release(_locks.pop())


def begin_command() -> None:
    """A new command (or outermost Python API call) begins: the runs of the last one are forgotten."""
    if _entered[0] == 0:
        _active.clear()
        _dropped.clear()


def resumable_runs() -> list[str]:
    """The folders of the runs the last command started or resumed that hold a run to resume (after
    abandon_unsaved_runs: those that saved something)."""
    return [r.root for r in _active if r.exists()]


def dropped_runs() -> list[str]:
    """The folders whose run records the last command dropped (abandon_unsaved_runs)."""
    return list(_dropped)


def forgets_unsaved_runs_on_refusal(fn):
    """Decorates a pipeline entry point of the Python API the way the command line behaves: a
    UserError raised inside it drops the run records it started without saving anything, and the
    output folders it locked are free again when the outermost entry point returns or raises (a
    report written after the training is still under the lock)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        begin_command()
        _entered[0] += 1
        try:
            return fn(*args, **kwargs)
        except (UserError, KeyboardInterrupt):  # a refusal, or Ctrl-C: what saved nothing is forgotten
            abandon_unsaved_runs()
            raise
        finally:
            _entered[0] -= 1
            if _entered[0] == 0:
                release_runs()

    return wrapper


def check_output_outside(out: str, **folders: str | None) -> None:
    """Refuses an output folder that is, or lies inside, a data folder (keyword: its option, data
    -> --data): the run's files (a report's plot, a class folder made of a run folder) would be
    read as data, and its identity would change as the run writes."""
    from ..data.folders import lies_within

    for key, folder in folders.items():
        if folder and lies_within(out, folder):
            raise UserError(f"argument --output '{out}' lies inside --{key.replace('_', '-')} '{folder}': the run's "
                            "files would be read as data; give an --output outside it")


def _first_missing(folder: str) -> str | None:
    """The outermost of `folder` and its parents that does not exist yet (None: it exists)."""
    folder, missing = os.path.abspath(folder), None
    while not os.path.isdir(folder):
        missing, parent = folder, os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


class RunDir:
    """root/run.json holds {"config": ..., "identity": ...}. check() on an existing run compares
    them (keys in `volatile` may change: worker counts, progress bars) and raises ResumeMismatch."""

    # what a run writes before it has anything to resume
    UNSAVED = (RUN_FILE, "log.txt", folder_lock.LOCK_FILE)

    def __init__(self, root: str, config: dict, identity: dict, volatile=("workers", "progress", "log_every"),
                 hints: dict | None = None, folders: dict | None = None):
        self.root = root
        self.hints = hints or {}  # key -> what to do instead, added to a refusal over that key
        self.config = {k: v for k, v in config.items() if k not in volatile}
        # folders: identity key -> data folder, recorded by folder_digest
        self.folders = dict(folders or {})
        self.identity = {**identity, **{k: folder_digest(v) for k, v in self.folders.items()}}
        self.path = os.path.join(root, RUN_FILE)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def check(self) -> None:
        with open(self.path) as f:
            old = json.load(f)
        recorded = old.get("identity", {})
        for key, folder in self.folders.items():  # a record of an older vitfast: its folder digest
            if recorded.get(key) not in (None, self.identity[key]) and recorded[key] == folder_digest(folder, legacy=True):
                recorded[key] = self.identity[key]
        for part, mine in (("identity", self.identity), ("config", self.config)):
            diff = _first_difference(json.loads(json.dumps(old.get(part, {}), default=str)),
                                     json.loads(json.dumps(mine, default=str)))
            if diff:
                key, was, now = diff
                hint = f"; {self.hints[key]}" if key in self.hints else ""
                raise ResumeMismatch(f"'{self.root}' holds a run with {part} {key}={was!r}, this one has {now!r}; "
                                     f"to start fresh use another --output (or delete '{self.root}'){hint}")

    def start(self, resume: bool = True) -> bool:
        """Returns True when an earlier run is there to resume (after checking it matches). The
        folder is locked for this process (rank 0 under torchrun) until release_runs(): a run
        started on a folder another live run writes is refused (engine.folder_lock)."""
        check_output_outside(self.root, **self.folders)
        self.created = _first_missing(self.root)  # a refused run removes the folders it made
        os.makedirs(self.root, exist_ok=True)
        if folder_lock.global_rank() == 0 and not folder_lock.holds(self.root):
            key = folder_lock.acquire(self.root, f"output folder '{self.root}'")
            if key:
                _locks.append(key)
        _active.append(self)
        if self.exists():
            if not resume:
                raise ResumeMismatch(f"'{self.root}' already holds a run; resume it (--resume) or use another --output")
            self.check()
            return True
        atomic_write_json(self.path, {"config": self.config, "identity": self.identity})
        _started.append(self)
        return False

    def abandon_if_unsaved(self) -> bool:
        """Removes run.json when the folder holds nothing else of the run (no checkpoint, no stage
        result): a run stopped by a wrong argument has nothing to protect. A run that saved
        anything, or was killed (no Python error path), stays binding. Returns whether it removed."""
        if not os.path.exists(self.path) or not all(name in self.UNSAVED for name in os.listdir(self.root)):
            return False
        os.remove(self.path)
        if getattr(self, "created", None):  # and the folders the run made: no empty --output left
            for name in os.listdir(self.root):
                os.remove(os.path.join(self.root, name))
            folder = os.path.abspath(self.root)
            # up to the outermost it made, each while empty (another run may share a parent)
            while not os.listdir(folder):
                os.rmdir(folder)
                if folder == self.created:
                    break
                folder = os.path.dirname(folder)
        elif folder_lock.holds(self.root):  # the user's folder is left as it was
            os.remove(os.path.join(self.root, folder_lock.LOCK_FILE))
        return True
