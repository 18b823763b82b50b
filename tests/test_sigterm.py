"""SIGTERM, a scheduler's stop (Slurm's time limit or preemption, Kubernetes, torchrun's agent):
the training step in progress finishes, the run saves at that step and stops; the same command
resumes there and ends with the weights of an uninterrupted run, bit for bit. DataLoader workers
that get the signal too (Slurm signals every process of the job) are left to the main process.
Under torchrun the ranks agree on the step. The command line says so in one line, status 143."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from vitfast.engine import sigterm
from vitfast.engine.trainer import CHECKPOINT, STEP_CHECKPOINT

from test_minivit_pipeline import folder_and_teacher, swin_args, vitfast  # noqa: F401 (a fixture)
from test_step_checkpoint import STEPS, _ddp, _same, _train


def _train_signalled(out, at, workers=0, rank=0, world=1):
    """_train, with SIGTERM arriving during the forward of the `at`-th step this call runs."""
    import test_step_checkpoint as tsc

    calls = {"n": 0}
    original = tsc.nn.functional.cross_entropy

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    tsc.nn.functional.cross_entropy = cross_entropy
    try:
        return _train(out, workers, rank=rank, world=world)
    finally:
        tsc.nn.functional.cross_entropy = original


@pytest.mark.parametrize("at", [5, STEPS, STEPS + 2])
def test_sigterm_in_training_saves_at_that_step_and_resumes_exactly(tmp_path, at):
    """Within epoch 1, at its last step (the epoch's end runs on resume) and within epoch 2; the
    handler is fit's own (a Python API call) and is gone afterwards."""
    whole, history, _ = _train(str(tmp_path / "whole"))
    out = str(tmp_path / "stopped")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(sigterm.Terminated) as stop:
        _train_signalled(out, at)
    assert signal.getsignal(signal.SIGTERM) is before and not sigterm.requested()
    epoch, step = (at - 1) // STEPS + 1, (at - 1) % STEPS + 1
    assert stop.value.where == f"saved at step {step}/{STEPS} of epoch {epoch}/2"
    from vitfast.engine.checkpoint import read_training_meta

    assert read_training_meta(os.path.join(out, STEP_CHECKPOINT))["extra"]["step"] == step
    state, resumed_history, lines = _train(out)
    assert f"train: resuming at step {step}/{STEPS} of epoch {epoch}/2" in lines, lines
    _same(state, whole)
    strip = ("train_images_per_s", "train_epoch_s")
    assert [{k: v for k, v in e.items() if k not in strip} for e in resumed_history] == \
        [{k: v for k, v in e.items() if k not in strip} for e in history]


def test_sigterm_without_an_output_folder_stops_at_once():
    """Nothing to save into: the signal is not deferred, and under the command line's handler it
    raises where it arrives."""
    before = signal.getsignal(signal.SIGTERM)
    assert sigterm.install()
    try:
        with pytest.raises(sigterm.Terminated) as stop, sigterm.deferred(active=False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted: the handler runs between bytecodes
    finally:
        sigterm.uninstall()
    assert stop.value.where == "" and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("own_handler", [False, True])
def test_fit_guards_a_callers_loader_only_when_its_handler_is_in_charge(tmp_path, own_handler):
    """Without a SIGTERM handler of the program's own, fit gives the caller's DataLoader
    worker_init (its workers leave the signal to fit); with one, the loader is left as it is."""
    from torch.utils.data import DataLoader, TensorDataset

    from vitfast.engine import TrainConfig, fit

    data = TensorDataset(torch.randn(8, 4))
    made = []

    def batches(epoch):
        made.append(DataLoader(data, batch_size=4, num_workers=1))
        return made[-1]

    def loss_fn(m, batch):
        return m(batch[0]).square().mean(), len(batch[0]), {}

    before = signal.signal(signal.SIGTERM, lambda *_: None) if own_handler else None
    try:
        fit(torch.nn.Linear(4, 2), TrainConfig(epochs=1), batches=batches, steps_per_epoch=2, loss_fn=loss_fn,
            device="cpu", out_dir=str(tmp_path / "out"), progress=False, log=lambda *_: None)
    finally:
        if own_handler:
            signal.signal(signal.SIGTERM, before)
    assert made[0].worker_init_fn is (None if own_handler else sigterm.worker_init)


def test_a_timm_prefetch_loader_is_seen_through():
    """timm's PrefetchLoader (create_loader's default) wraps the DataLoader as `.loader`: that one
    is guarded (while vitfast's handler is in charge), and the wrapper's batches come through
    unchanged."""
    from timm.data.loader import PrefetchLoader
    from torch.utils.data import DataLoader, TensorDataset

    images, labels = torch.rand(6, 3, 4, 4), torch.arange(6)
    inner = DataLoader(TensorDataset(images, labels), batch_size=3, num_workers=1)
    wrapped = PrefetchLoader(inner, device=torch.device("cpu"))
    assert list(sigterm.iterate(wrapped)) and inner.worker_init_fn is None  # vitfast's handler is not in charge
    assert sigterm.install()
    try:
        batches = list(sigterm.iterate(wrapped))
    finally:
        sigterm.uninstall()
    assert inner.worker_init_fn is sigterm.worker_init
    assert [y.tolist() for _, y in batches] == [[0, 1, 2], [3, 4, 5]]
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), torch.cat([x for x, _ in wrapped]))


def test_a_request_pending_when_training_ends_stops_before_what_follows():
    """A signal during the last epoch's evaluation or checkpoint (past the last vote) still stops
    the command before the work after training starts."""
    with pytest.raises(sigterm.Terminated) as stop:
        with sigterm.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert sigterm.requested()
    assert stop.value.where == "after training"
    assert not sigterm.installed()


# a process group of its own, so that the signal reaches the DataLoader workers too (as Slurm's does)
GROUP_SCRIPT = textwrap.dedent("""
    import os, signal, subprocess, sys
    sys.path.insert(0, sys.argv[3])
    import functools
    import torch
    import test_step_checkpoint as tsc
    from vitfast.engine import sigterm

    # "vitfast": the loader as vitfast's own are made (workers leave a scheduler's SIGTERM to the
    # main process); "plain": a user's, which fit gives worker_init; "own": a user's with a
    # worker_init_fn of its own, which fit keeps (it marks each worker it ran in)
    def mark(worker_id):
        open(os.path.join(sys.argv[1], f"worker_{worker_id}_{os.getpid()}"), "w").close()

    loader = sys.argv[4]
    if loader in ("vitfast", "own"):
        tsc.DataLoader = functools.partial(torch.utils.data.DataLoader,
                                           worker_init_fn=sigterm.worker_init if loader == "vitfast" else mark)
    if loader in ("starting", "wrapped"):  # a plain loader; the signal comes while epoch 2's workers start
        import multiprocessing.context as mpc
        import time

        started = sys.argv[1] + ".started"

        class SlowStart(mpc.ForkProcess):
            def run(self):  # in a new worker, before anything of PyTorch's or vitfast's runs there
                with open(started, "a") as f:
                    f.write("x")
                if os.path.getsize(started) == 3:  # epoch 2's first worker (2 per epoch)
                    subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgid(0)}"])
                time.sleep(0.5)  # the time a worker takes to reach worker_init, stretched
                super().run()

        class Context(mpc.ForkContext):
            Process = SlowStart

        class Prefetch:  # a wrapper as timm's PrefetchLoader: the workers start at its first item
            def __init__(self, loader):
                self.loader = loader

            def __len__(self):
                return len(self.loader)

            def __iter__(self):
                for batch in self.loader:
                    yield batch

        def make(*args, **kwargs):
            made = torch.utils.data.DataLoader(*args, multiprocessing_context=Context(), **kwargs)
            return Prefetch(made) if loader == "wrapped" else made

        tsc.DataLoader = make

    at, calls, original = int(sys.argv[2]), {"n": 0}, tsc.nn.functional.cross_entropy

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:  # sent by another process, as a scheduler's is: a worker takes a signal from
            # its parent (the main process) as the parent ending it
            subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgid(0)}"])
        return original(*args, **kwargs)

    tsc.nn.functional.cross_entropy = cross_entropy
    try:
        state, _, _ = tsc._train(sys.argv[1], workers=2)
    except sigterm.Terminated as exc:
        print("stopped:", exc.where, flush=True)
        sys.exit(143)
    torch.save(state, os.path.join(sys.argv[1], "final.pt"))
""")


@pytest.mark.parametrize("loader", ["vitfast", "plain", "own", "starting", "wrapped"])
def test_sigterm_to_the_whole_process_group_with_data_loader_workers(tmp_path, loader):
    """The workers get the signal too and keep serving the main process, which saves and ends them
    (a worker killed by it would make PyTorch raise in the middle of a step): with vitfast's
    loaders, and with a user's, with or without a worker_init_fn of its own (which still runs).
    "starting": the signal comes while an epoch's new workers start, before their worker_init
    could run (they start with SIGTERM blocked); "wrapped": the same with the loader inside a
    wrapper (as timm's PrefetchLoader), whose workers start at its first item."""
    here = os.path.dirname(__file__)
    whole, _, _ = _train(str(tmp_path / "whole"), workers=2)
    out = str(tmp_path / "stopped")
    run = [sys.executable, "-c", GROUP_SCRIPT, out]
    at, saved = (0, 1) if loader in ("starting", "wrapped") else (STEPS + 4, 4)
    first = subprocess.run(run + [str(at), here, loader], capture_output=True, text=True, timeout=300,
                           start_new_session=True)
    assert first.returncode == 143, first.stderr[-3000:]
    assert first.stdout.strip() == f"stopped: saved at step {saved}/10 of epoch 2/2", \
        first.stdout + first.stderr[-2000:]
    assert "DataLoader worker" not in first.stderr, first.stderr[-2000:]
    marks = [n for n in os.listdir(out) if n.startswith("worker_")]
    assert len(marks) == (4 if loader == "own" else 0), marks  # 2 workers in each of 2 epochs
    second = subprocess.run(run + ["0", here, loader], capture_output=True, text=True, timeout=300,
                            start_new_session=True)
    assert second.returncode == 0, second.stderr[-3000:]
    _same(torch.load(os.path.join(out, "final.pt")), whole)


def _ddp_signalled(rank, world, init, out, at, results):
    """test_step_checkpoint's DDP worker, with SIGTERM reaching rank 1 alone at its `at`-th step."""
    import torch.distributed as dist

    os.environ["RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        state, _, lines = (_train_signalled(out, at, rank=rank, world=world) if rank == 1 and at else
                           _train(out, rank=rank, world=world))
        results.put((rank, ({k: v.numpy().copy() for k, v in state.items()}, lines)))
    except sigterm.Terminated as exc:
        results.put((rank, f"stopped: {exc.where}"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("at,saved", [(5, 6), (STEPS, STEPS)])
def test_ddp_ranks_agree_on_the_step_and_resume_exactly(tmp_path, at, saved):
    """The signal reaches one rank only, within step `at` of epoch 2: both stop after the same
    step, the step file holds both ranks' streams, and the resumed run ends with the uninterrupted
    run's weights. The vote is pipelined (no step waits for it): its answer is read a step later,
    so the ranks stop one step after the signal's, or at the epoch's last step when it came there."""
    whole = _ddp(tmp_path, "init_whole", str(tmp_path / "whole"))
    out = str(tmp_path / "stopped")
    stopped = _ddp(tmp_path, "init_stop", out, stop_at=STEPS + at, worker=_ddp_signalled)
    line = f"stopped: saved at step {saved}/10 of epoch 2/2"
    assert stopped == {0: line, 1: line}
    resumed = _ddp(tmp_path, "init_resume", out)
    assert f"train: resuming at step {saved}/10 of epoch 2/2" in resumed[0][1], resumed[0][1]
    _same(resumed[0][0], whole[0][0])
    _same(resumed[1][0], whole[0][0])


# `vitfast lowrank` up to its run record, then a short training run in its folder (fit, one epoch of
# slow steps) or, with "outside", work outside training; SIGTERM arrives once it says "working"
TRAINING_LOWRANK = textwrap.dedent("""
    import os, sys, time
    import torch
    import vitfast.lowrank.pipeline as pipeline
    from vitfast.engine import TrainConfig, fit

    def slow(model, proxy, cfg, out_dir, *args, **kwargs):
        if sys.argv[2] == "outside":
            print("working", flush=True)
            time.sleep(120)
        net = torch.nn.Linear(4, 2)

        def loss_fn(m, batch):
            print("working", flush=True)
            time.sleep(0.2)
            return m(batch).square().mean(), len(batch), {}

        fit(net, TrainConfig(epochs=1), batches=lambda e: [torch.randn(3, 4) for _ in range(500)],
            steps_per_epoch=500, loss_fn=loss_fn, device="cpu", out_dir=os.path.join(out_dir, "train"),
            progress=False)

    pipeline.run_lowrank = slow
    from vitfast.cli import main
    sys.exit(main(["lowrank", "--output", sys.argv[1]]))
""")


@pytest.mark.parametrize("where", ["training", "outside"])
def test_the_command_line_says_where_sigterm_stopped_in_one_line(tmp_path, where):
    from test_interrupt import _interrupted

    out = tmp_path / "out"
    rc, err = _interrupted([sys.executable, "-c", TRAINING_LOWRANK, str(out), where],
                           lambda p: p.stdout.readline().strip() == "working", sig=signal.SIGTERM)
    assert rc == 143 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    if where == "training":
        import re

        assert re.fullmatch(r"vitfast: stopped by SIGTERM \(saved at step (\d+)/500 of epoch 1/1\); the same "
                            rf"command resumes from what was saved in '{re.escape(str(out))}'", lines[0]), lines
        assert (out / "train" / STEP_CHECKPOINT).exists() and not (out / "train" / CHECKPOINT).exists()
    else:
        assert lines == ["vitfast: stopped by SIGTERM; nothing was saved (the run record is dropped: the command "
                         "may change)"]
        assert not out.exists()


def test_a_distillation_stopped_within_an_epoch_resumes_there_exactly(tmp_path):
    """tinyvit distill (the Python API) stopped by SIGTERM within its second epoch: the resumed run
    starts the store's replay at that batch (nothing loaded twice) and ends bit for bit like the
    uninterrupted one."""
    import vitfast.tinyvit.train as train
    from test_tinyvit_pipeline import small_setup
    from vitfast.models.digits_vit import load_digits_teacher
    from vitfast.tinyvit import distill, save_logits
    from vitfast.tinyvit.defaults import MIXUP, digits_student, digits_transform

    ds, _ = small_setup(48)
    store = str(tmp_path / "store")
    save_logits(load_digits_teacher(), ds, digits_transform(), store, range(2), k=5, mixup_args=MIXUP,
                progress=False, log=lambda *_: None)

    def run(out, at=None, log=lambda *_: None):
        torch.manual_seed(0)
        student = digits_student()
        calls, original = {"n": 0}, train.sparse_soft_target_cross_entropy

        def loss(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(*args, **kwargs)

        train.sparse_soft_target_cross_entropy = loss
        try:
            distill(student, ds, digits_transform(), store, 3, batch_size=8, checkpoint_dir=out, progress=False,
                    log=log)
        finally:
            train.sparse_soft_target_cross_entropy = original
        return student.state_dict()

    whole = run(str(tmp_path / "whole"))
    out = str(tmp_path / "stopped")
    with pytest.raises(sigterm.Terminated) as stop:
        run(out, at=6 + 4)  # 6 steps per epoch
    assert stop.value.where == "saved at step 4/6 of epoch 2/3"
    lines = []
    _same(run(out, log=lines.append), whole)
    assert "distill: resuming at step 4/6 of epoch 2/3" in lines, lines


@pytest.mark.slow
def test_sigterm_to_a_minivit_run_and_its_workers_then_resume(folder_and_teacher, tmp_path):
    """`vitfast minivit` (a tiny Swin on an ImageFolder, a DataLoader worker) signalled as Slurm
    does it, process group and all, once its first epoch is saved: one line, status 143; the same
    command (in-process loading now) finishes with the uninterrupted run's weights, bit for bit."""
    import re

    from safetensors.torch import load_file

    data, ckpt, _ = folder_and_teacher
    ref, out = str(tmp_path / "ref"), tmp_path / "out"
    done = vitfast(*swin_args(data, ckpt, ref, epochs=3))
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen([sys.executable, "-m", "vitfast", *swin_args(data, ckpt, str(out), epochs=3,
                                                                          extra=("--workers", "1"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(r"vitfast: stopped by SIGTERM \((saved at step \d+/\d+ of|saved after) epoch \d/3\); "
                        rf"the same command resumes from what was saved in '{re.escape(str(out))}'", line), line
    assert not (out / "report.md").exists()
    done = vitfast(*swin_args(data, ckpt, str(out), epochs=3))
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(os.path.join(ref, "mini_model", "model.safetensors"))
    b = load_file(str(out / "mini_model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
