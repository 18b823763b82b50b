"""SIGTERM, the signal a scheduler sends before it kills a job: Slurm at the time limit, on scancel
or preemption (to every process of the job), Kubernetes on eviction, torchrun's agent to its
workers when it is stopped. Inside training (`deferred`) the step in progress finishes, every rank
agrees to stop at the same step, the run saves there and raises `Terminated`; the same command
resumes at that step. Anywhere else the handler raises `Terminated` at once, as Ctrl-C raises
KeyboardInterrupt: what was saved stays. The command line exits with status 143 (128 + SIGTERM).

A DataLoader worker gets the scheduler's signal too, and a worker killed by it would make the
main process raise (PyTorch's SIGCHLD check) in the middle of a step; `worker_init` leaves such a
signal to the main process, which stops its loaders itself once it has saved."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading

import torch

EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised where SIGTERM stops a command. A KeyboardInterrupt, so that what treats Ctrl-C treats
    it (a run that saved nothing is forgotten; one line instead of a traceback) and no `except
    Exception` swallows it. `where`: what was saved, e.g. "saved at step 37/100 of epoch 3"."""

    def __init__(self, where: str = ""):
        super().__init__(where)
        self.where = where


_state = {"owner": None, "previous": None, "deferring": 0, "requested": False}


def _handler(signum, frame):
    if os.getpid() != _state["owner"]:  # a forked child that kept the handler: SIGTERM's default
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if _state["deferring"]:  # the training loop stops at its next step boundary, having saved
        _state["requested"] = True
        return
    raise Terminated()


def install(over_default_only: bool = False) -> bool:
    """SIGTERM raises Terminated in this process from now on (recorded instead inside `deferred`).
    Only the main thread can set a handler: elsewhere nothing changes and this returns False, as
    it does when the handler is already in place, or, with over_default_only, when the program
    has a SIGTERM handler of its own. `uninstall` puts back the one before."""
    current = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or current is _handler or \
            (over_default_only and current not in (signal.SIG_DFL, None)):
        return False
    _state.update(owner=os.getpid(), previous=signal.signal(signal.SIGTERM, _handler), requested=False)
    return True


def uninstall() -> None:
    """Puts back the handler `install` replaced (also after the command line set SIGTERM to ignore
    while it stops)."""
    if _state["owner"] == os.getpid() and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _state["previous"] if _state["previous"] is not None else signal.SIG_DFL)
    _state.update(owner=None, previous=None, requested=False)


def installed() -> bool:
    return signal.getsignal(signal.SIGTERM) is _handler


@contextlib.contextmanager
def deferred(active: bool = True, after: str = "after training"):
    """Within: SIGTERM is recorded (`requested`), not raised, so that a training loop can stop where
    it can save. Installs the handler for the duration when nobody has (a Python API call in the
    main thread whose SIGTERM has its default action). A request still pending when the block
    ends raises Terminated(after) then: the work after training (a report, a final evaluation) is
    not started under a signal. active=False: no deferral (nothing to save into)."""
    if not active:
        yield
        return
    mine = install(over_default_only=True)
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        pending = _state["requested"] and _state["deferring"] == 0
        if pending:
            _state["requested"] = False
        if mine:
            uninstall()
    if pending:
        raise Terminated(after)


def requested() -> bool:
    """Whether this process got SIGTERM inside `deferred` and has not stopped for it yet."""
    return _state["requested"]


_cpu_groups: dict = {}


def cpu_group():
    """A gloo group for the per-step stop vote (a CPU collective: no GPU synchronisation); the
    default group when it is gloo already. Collective the first time: every rank calls it at the
    same point (fit's start)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _cpu_groups:
        _cpu_groups[key] = dist.new_group(backend="gloo")
    return _cpu_groups[key]


def stop_agreed(world: int, group=None) -> bool:
    """Whether any rank got SIGTERM: every rank gets the same answer at the same step, so all stop
    and save together (under torchrun the signal reaches the ranks at different steps)."""
    flag = _state["requested"]
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


class StopVote:
    """A training loop's per-step stop vote, pipelined: `after_step()` starts the all-reduce of
    this rank's request and returns the answer of the one it started a step earlier, which has
    arrived meanwhile, so that no step waits for a round trip between hosts (one on two local
    processes: benchmarks/cpu_checkpoint_costs.py). Every rank gets the same answers at the same
    steps, so all stop at the same step, one after the step at which the first request was voted.
    `settle()` waits for the vote in flight (an epoch's end: no step follows to read it). One
    process: its own request, at once."""

    def __init__(self, world: int, group=None):
        self.world, self.group, self._pending = world, group, None

    def after_step(self) -> bool:
        if self.world == 1:
            return _state["requested"]
        if self.settle():  # every rank stops here: none starts another vote
            return True
        import torch.distributed as dist

        flag = torch.tensor([int(_state["requested"])], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return False

    def settle(self) -> bool:
        """The answer of the vote in flight (False when none is: one process has none)."""
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag.item())


def stopped() -> None:
    """The loop has saved and stops for the request (it raises Terminated next)."""
    _state["requested"] = False


def worker_init(worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn. A SIGTERM from the main process (PyTorch ending a stuck worker)
    still ends the worker at once; one from anybody else (a scheduler signalling every process of
    the job) is left to the main process, which saves and then ends its loaders. The signal is
    blocked and taken by a thread that reads who sent it."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait():
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent or os.getppid() != parent:  # from the main process, or it is gone
                os._exit(0)

    threading.Thread(target=wait, name="vitfast-sigterm", daemon=True).start()


def _then(own, worker_id: int) -> None:
    worker_init(worker_id)
    own(worker_id)


def _has_workers(loader) -> bool:
    from torch.utils.data import DataLoader

    return isinstance(loader, DataLoader) and loader.num_workers > 0


def _inner_loader(obj, depth: int = 3):
    """The DataLoader `obj` iterates: itself, or one it wraps as `.loader` (timm's PrefetchLoader
    does), or None."""
    from torch.utils.data import DataLoader

    for _ in range(depth):
        if obj is None or isinstance(obj, DataLoader):
            return obj
        obj = getattr(obj, "loader", None)
    return obj if isinstance(obj, DataLoader) else None


@contextlib.contextmanager
def _blocked():
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _first_item_blocked(it):
    with _blocked():  # a wrapper's generator starts the loader's workers at its first item
        try:
            first = next(it)
        except StopIteration:
            return
    yield first
    yield from it


def iterate(loader):
    """iter(loader), with its workers leaving a scheduler's SIGTERM to the main process from their
    first instruction on: `guard_workers`, and SIGTERM blocked in this thread while they start (a
    child inherits the signal mask; worker_init then takes the signal over). Otherwise a signal
    that came while an epoch's new workers started killed one before its worker_init ran, and the
    main process raised instead of saving. A SIGTERM to this process meanwhile is still recorded
    (by another thread, or once the mask is lifted). A wrapper of a DataLoader (`.loader`, as timm's PrefetchLoader) is
    handled too: its loader is guarded, and its first item drawn with SIGTERM blocked. Only while
    this module's handler is in charge: a program with a SIGTERM handler of its own keeps its
    loaders as they are."""
    inner = _inner_loader(loader)
    if not (_has_workers(inner) and installed()) or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    guard_workers(inner)
    if inner is loader:
        with _blocked():
            return iter(loader)
    return _first_item_blocked(iter(loader))


def guard_workers(loader) -> None:
    """Makes a DataLoader's workers leave a scheduler's SIGTERM to the main process (`worker_init`,
    before the loader's own worker_init_fn, which still runs), for loaders a caller made without
    it: engine.fit applies this (through `iterate`) to what batches(epoch) returns. Anything but a
    DataLoader with workers, or one that has it already, is left as it is."""
    if not _has_workers(loader):
        return
    own = loader.worker_init_fn
    if own is worker_init or isinstance(own, functools.partial) and own.func is _then:
        return
    loader.worker_init_fn = worker_init if own is None else functools.partial(_then, own)
