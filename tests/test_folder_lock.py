"""engine.folder_lock: one live run per output folder. A second process started on a folder that a
running process writes is refused, naming the holder; a killed holder leaves no stale lock; the
same process may start and resume a folder as often as it likes; a logit store's shard has one
writer."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vitfast.engine import folder_lock
from vitfast.engine.run import RunDir, forgets_unsaved_runs_on_refusal, release_runs

HOLDER = textwrap.dedent("""
    import os, sys, time
    from vitfast.engine.run import RunDir
    RunDir(sys.argv[1], {"lr": 1.0}, {"data": "x"}).start()
    if os.fork() == 0:  # a child that outlives its parent, as DataLoader workers do for seconds
        time.sleep(15)
        os._exit(0)
    print("held", flush=True)
    sys.stdin.read()  # holds the folder until the test closes stdin (or kills it)
""")

SHARD_WRITER = textwrap.dedent("""
    import sys
    from vitfast.tinyvit.store import ShardWriter, StoreMeta
    meta = StoreMeta(k=3, num_classes=10, encoding="exact", teacher="t", dataset_size=4, seed=0)
    writer = ShardWriter(sys.argv[1], meta, epoch=0, rank=0, world=1)
    print("writing", flush=True)
    sys.stdin.read()
""")

TRY = textwrap.dedent("""
    import sys
    from vitfast.engine import folder_lock
    try:
        folder_lock.acquire(sys.argv[1])
        print("free")
    except folder_lock.FolderInUse as exc:
        print("in use:", exc)
""")


@pytest.fixture
def holder(tmp_path):
    """A second process holding tmp_path/out as a running vitfast run does."""
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _other_process_sees(folder) -> str:
    return subprocess.run([sys.executable, "-c", TRY, str(folder)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_command_on_a_folder_a_live_run_holds_is_refused_naming_the_holder(holder, capsys):
    from vitfast.cli import main

    out, proc = holder
    before = open(os.path.join(out, "run.json")).read()
    assert main(["lowrank", "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"output folder '{out}' is in use by another vitfast run (pid {proc.pid} on " in err, err
    assert "python -c" in err and "give another --output" in err
    assert open(os.path.join(out, "run.json")).read() == before  # the live run's record untouched
    assert sorted(os.listdir(out)) == [".vitfast.lock", "run.json"]
    # once the holder ends, the same folder resumes (its configuration matches)
    proc.stdin.close()
    proc.wait()
    run = RunDir(out, {"lr": 1.0}, {"data": "x"})
    assert run.start() is True
    release_runs()


def test_a_killed_holder_leaves_no_stale_lock(holder):
    out, proc = holder
    assert _other_process_sees(out).startswith("in use:")
    proc.send_signal(signal.SIGKILL)  # no Python clean-up runs: the kernel drops the lock
    proc.wait()
    # at once, though the holder's forked child still runs with the lock file open
    assert _other_process_sees(out) == "free"
    assert RunDir(out, {"lr": 1.0}, {"data": "x"}).start() is True
    release_runs()
    assert not folder_lock._held


def test_one_process_starts_a_folder_again_and_frees_it_when_its_command_ends(tmp_path):
    out = str(tmp_path / "out")
    assert RunDir(out, {"lr": 1.0}, {"data": "x"}).start() is False
    assert RunDir(out, {"lr": 1.0}, {"data": "x"}).start() is True  # a second start in one process nests
    assert folder_lock.holds(out) and _other_process_sees(out).startswith("in use:")
    release_runs()
    assert not folder_lock.holds(out) and _other_process_sees(out) == "free"


def test_the_python_api_holds_its_folders_until_the_outermost_entry_point_returns(tmp_path):
    """run_minivit writes its report after train_mini returns: the lock lasts the whole call."""
    inner_out, outer_out = str(tmp_path / "inner"), str(tmp_path / "outer")
    seen = {}

    @forgets_unsaved_runs_on_refusal
    def inner():
        RunDir(inner_out, {"lr": 1.0}, {"data": "x"}).start()

    @forgets_unsaved_runs_on_refusal
    def outer():
        RunDir(outer_out, {"lr": 1.0}, {"data": "x"}).start()
        inner()
        seen["after inner"] = folder_lock.holds(inner_out), folder_lock.holds(outer_out)

    outer()
    assert seen["after inner"] == (True, True)
    assert not folder_lock._held


def test_a_refused_command_frees_its_folder(tmp_path, capsys):
    """cli.main releases in every case: here a timm name that does not exist, found after the run
    record was written (the record and the folder it made are dropped, the lock let go)."""
    from vitfast.cli import main

    out = tmp_path / "out"
    assert main(["lowrank", "--model", "no_such_model_xyz", "--data", os.devnull, "--out", str(out)]) == 2
    assert "no_such_model_xyz" in capsys.readouterr().err
    assert not folder_lock._held and not out.exists()


def test_only_rank_zero_locks_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = str(tmp_path / "out")
    RunDir(out, {"lr": 1.0}, {"data": "x"}).start()
    assert not folder_lock.holds(out) and not os.path.exists(os.path.join(out, folder_lock.LOCK_FILE))


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(folder_lock.fcntl, "lockf", no_locks)
    monkeypatch.setattr(folder_lock, "_warned", False)
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning, match="No locks available"):
        assert RunDir(out, {"lr": 1.0}, {"data": "x"}).start() is False
    assert not folder_lock.holds(out)
    assert os.path.exists(os.path.join(out, "run.json"))


def test_a_store_shard_has_one_writer(tmp_path):
    """Two save-logits jobs given the same epochs: the second writer of a shard is refused (it
    would write into the first one's .tmp file); other epochs and ranks are written side by side."""
    from vitfast.tinyvit.store import ShardWriter, StoreError, StoreMeta, epoch_state, read_header

    meta = StoreMeta(k=3, num_classes=10, encoding="exact", teacher="t", dataset_size=4, seed=0)
    first = subprocess.Popen([sys.executable, "-c", SHARD_WRITER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "writing"
        # inspect tells a live writer's file from a stopped one's (F_GETLK: nothing taken)
        assert f"unfinished rank_0000.vfl.tmp (being written by pid {first.pid})" in \
            epoch_state(str(tmp_path), meta, 0).describe()
        with pytest.raises(StoreError, match=r"epoch 0, rank 0 of store .* is being written by another process"):
            ShardWriter(str(tmp_path), meta, epoch=0, rank=0, world=1)
        other = ShardWriter(str(tmp_path), meta, epoch=1, rank=0, world=1)  # another epoch, side by side
        probs = np.array([[0.5, 0.3, 0.2]] * 4, np.float32)
        other.add(np.arange(4), np.arange(4), probs, np.array([[1, 2, 3]] * 4))
        assert read_header(other.close(), meta)[-3] == 4
    finally:
        first.kill()
        first.wait()
    assert "unfinished rank_0000.vfl.tmp (left by a writer that stopped; save-logits rewrites it)" in \
        epoch_state(str(tmp_path), meta, 0).describe()
    # the killed writer's .tmp is rewritten by the next job
    again = ShardWriter(str(tmp_path), meta, epoch=0, rank=0, world=1)
    again.add(np.arange(2), np.arange(2), probs[:2], np.array([[1, 2, 3]] * 2))
    assert read_header(again.close(), meta)[-3] == 2


def test_only_rank_zero_forgets_a_refused_run(tmp_path, monkeypatch):
    """Every rank raises the same refusal: rank 0 alone removes the record (two ranks removing one
    file raced)."""
    from vitfast.engine.run import abandon_unsaved_runs

    out = str(tmp_path / "out")
    monkeypatch.setenv("RANK", "1")
    RunDir(out, {"lr": 1.0}, {"data": "x"}).start()
    abandon_unsaved_runs()
    assert os.path.exists(os.path.join(out, "run.json"))
    monkeypatch.setenv("RANK", "0")
    RunDir(out + "2", {"lr": 1.0}, {"data": "x"}).start()
    abandon_unsaved_runs()
    assert not os.path.exists(out + "2")


def test_the_python_api_locks_the_folders_it_writes(holder, tmp_path):
    """engine.fit (its out_dir: distill, GFM, any training of your own) and lowrank.run_lowrank
    hold their folder as the command line does: a second process is refused before anything is
    loaded or written, naming the holder."""
    import torch

    from vitfast.engine import TrainConfig, fit
    from vitfast.lowrank.pipeline import LowRankConfig, run_lowrank

    out, proc = holder
    before = sorted(os.listdir(out))
    net = torch.nn.Linear(2, 2)
    with pytest.raises(folder_lock.FolderInUse, match=rf"checkpoint folder '{out}' is in use by another vitfast "
                                                      rf"run \(pid {proc.pid} on "):
        fit(net, TrainConfig(epochs=1), batches=lambda e: [torch.randn(2, 2)], steps_per_epoch=1,
            loss_fn=lambda m, b: (m(b).sum(), 2, {}), device="cpu", out_dir=out, progress=False)
    with pytest.raises(folder_lock.FolderInUse, match=rf"output folder '{out}' is in use"):
        run_lowrank(net, torch.randn(4, 2), LowRankConfig(), out, "linear")
    assert sorted(os.listdir(out)) == before and not folder_lock._held
    # a folder fit makes and then writes nothing into (a refusal) is removed again
    fresh = tmp_path / "fresh"
    with pytest.raises(Exception, match="had no batches"):
        fit(net, TrainConfig(epochs=1), batches=lambda e: [], steps_per_epoch=1,
            loss_fn=lambda m, b: (m(b).sum(), 2, {}), device="cpu", out_dir=str(fresh), progress=False)
    assert not fresh.exists() and not folder_lock._held
    # one that trained keeps its checkpoint (and the lock file, which binds nobody once released)
    fit(net, TrainConfig(epochs=1), batches=lambda e: [torch.randn(2, 2)], steps_per_epoch=1,
        loss_fn=lambda m, b: (m(b).sum(), 2, {}), device="cpu", out_dir=str(fresh), progress=False)
    assert sorted(os.listdir(fresh)) == [".vitfast.lock", "checkpoint.safetensors"]
    assert _other_process_sees(fresh) == "free"
