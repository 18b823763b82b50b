"""One live run per output folder. A second process started on a folder that a running process
writes (a job resubmitted while the first still runs, the same command in two terminals) would
interleave checkpoints and run records; it is refused at its start with who holds the folder.

The guard is a POSIX record lock (fcntl F_SETLK) on a hidden file in the folder: the kernel drops
it when the holder exits, however it exits, so a killed run never leaves a stale lock and resumes as
before. Not flock: flock locks are shared with forked children, and DataLoader workers outlive a
killed parent by seconds, which blocked the resume. A record lock belongs to the process alone;
it also ends when the process closes any descriptor of the file, so each file is opened once per
process (_held). A file system without locks runs unguarded, with a one-time warning."""
from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import socket
import sys
import time
import warnings

from ..errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no guard
    fcntl = None

LOCK_FILE = ".vitfast.lock"


class FolderInUse(UserError):
    pass


# lock file (real path) -> [fd, depth]: taking a lock this process holds nests (and never opens the
# file twice: closing the second descriptor would drop the lock)
_held: dict[str, list] = {}
_warned = False


def global_rank() -> int:
    """This process's rank under torchrun, also before the process group is set up (RANK)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def _holder(fd: int) -> str:
    """What the holder wrote into the lock file: pid, host, start time and command."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    command = f": {info['command']}" if info.get("command") else ""
    return f"pid {info['pid']} on {info.get('host', '?')}, started {started}{command}"


def _unguarded(path: str, exc: OSError) -> None:
    global _warned
    if not _warned:
        warnings.warn(f"vitfast: cannot lock '{path}' ({exc.strerror or exc}); this file system has no locks, "
                      "so two runs started on one output folder are not kept apart", stacklevel=3)
        _warned = True


def _command() -> str:
    """This process's command line as typed: `vitfast minivit ...`, `python -m vitfast ...`."""
    argv = list(sys.argv) or [""]
    name = os.path.basename(argv[0])
    if name == "__main__.py":
        name = f"python -m {os.path.basename(os.path.dirname(argv[0]))}"
    elif name in ("-c", ""):
        name = f"python {name}".strip()
    return " ".join([name, *argv[1:]])[:2000]


def try_lock(fd: int, path: str) -> bool:
    """An exclusive record lock on the whole of `fd`'s file (open for writing) without waiting:
    True when taken, False when the file system has no locks (warned once); FolderInUse when
    another process holds it. Released when this process closes any descriptor of the file."""
    if fcntl is None:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise FolderInUse(f"'{path}' is locked by another process") from None
        _unguarded(path, exc)
        return False
    return True


def holder_pid(path: str) -> int | None:
    """The pid of another process holding a record lock on `path` (F_GETLK: nothing is taken, so
    a writer starting meanwhile is not disturbed); None when none does, or it cannot be told
    (not Linux, whose struct flock layout this packs; a file system without locks)."""
    if fcntl is None or not sys.platform.startswith("linux"):
        return None
    import struct

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:  # struct flock: l_type, l_whence, l_start, l_len, l_pid
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


def acquire(folder: str, what: str | None = None) -> str | None:
    """Locks `folder` (which must exist) for this process; returns the key for release(), or None
    when the file system has no locks. Raises FolderInUse, naming the holder, when another process
    holds it."""
    path = os.path.realpath(os.path.join(folder, LOCK_FILE))
    if fcntl is None:
        return None
    if path in _held:
        _held[path][1] += 1
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = try_lock(fd, path)
    except FolderInUse:
        holder = _holder(fd)
        os.close(fd)
        raise FolderInUse(f"{what or repr(folder)} is in use by another vitfast run ({holder}); wait for it to end, "
                          "or give another --output") from None
    if not locked:
        os.close(fd)
        return None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": _command()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[path] = [fd, 1]
    return path


def release(key: str | None) -> None:
    """Undoes one acquire(); the last one closes the file, which drops the lock."""
    if key is None or key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        os.close(_held.pop(key)[0])


def holds(folder: str) -> bool:
    """Whether this process holds the lock of `folder`."""
    return os.path.realpath(os.path.join(folder, LOCK_FILE)) in _held


@contextlib.contextmanager
def held(folder: str | None, what: str | None = None):
    """`folder` locked by this process for the block (rank 0 under torchrun; None: nothing), made
    when missing; a folder it made that holds nothing but the lock file afterwards (the work was
    refused before it wrote) is removed again."""
    if folder is None or global_rank() != 0:
        yield
        return
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    key = acquire(folder, what)
    try:
        yield
    finally:
        release(key)
        if made and not holds(folder) and sorted(os.listdir(folder)) in ([], [LOCK_FILE]):
            with contextlib.suppress(OSError):
                if os.path.exists(os.path.join(folder, LOCK_FILE)):
                    os.remove(os.path.join(folder, LOCK_FILE))
                os.rmdir(folder)


def holds_output(param: str, what: str):
    """Decorates a Python API entry point that writes into the folder given as argument `param`:
    the folder is `held` while it runs, so that two processes never write one folder (the
    command line's RunDir holds it already: the lock nests)."""
    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            folder = signature.bind_partial(*args, **kwargs).arguments.get(param)
            with held(folder, f"{what} '{folder}'"):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
