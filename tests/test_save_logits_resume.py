"""save-logits stopped within a shard (SIGTERM, Ctrl-C, an error, or killed outright) resumes at the
batch it had checkpointed, not at the shard's start: the teacher's work on the saved batches is
kept, and the store ends byte for byte like an uninterrupted one."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from vitfast.engine import sigterm

K, BATCH, EPOCHS, SAMPLES = 5, 8, 2, 48  # 6 batches an epoch (4 pairs each)


class CountingTeacher(torch.nn.Module):
    """The digits teacher, with `act(call)` run before each forward (call counts from 1)."""

    def __init__(self, act=None):
        super().__init__()
        from vitfast.models.digits_vit import load_digits_teacher

        self.inner, self.act, self.calls = load_digits_teacher(), act, 0
        self.num_classes = self.inner.num_classes

    def forward(self, x):
        self.calls += 1
        if self.act is not None:
            self.act(self.calls)
        return self.inner(x)


def _save(store, teacher, log=lambda *_: None, **kwargs):
    from test_tinyvit_pipeline import small_setup
    from vitfast.tinyvit import save_logits
    from vitfast.tinyvit.defaults import MIXUP, digits_transform

    ds, _ = small_setup(SAMPLES)
    return save_logits(teacher, ds, digits_transform(), str(store), range(EPOCHS), k=K, batch_size=BATCH,
                       mixup_args=MIXUP, teacher_name="vitfast_digits_vit", progress=False, log=log, **kwargs)


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole") / "store"
    _save(root, CountingTeacher())
    return _files(root)


def _resumed(store, whole, resumes_after):
    lines = []
    teacher = CountingTeacher()
    _save(store, teacher, log=lines.append)
    assert _files(store) == whole
    assert f"save-logits: epoch 1 rank 0: resuming after batch {resumes_after}/6 ({resumes_after * BATCH} records " \
           "saved)" in lines, lines
    assert teacher.calls == 6 - resumes_after  # epoch 0 was whole already; nothing of epoch 1 is computed twice


def test_sigterm_saves_the_shard_at_the_batch_and_resumes_there(tmp_path, whole):
    store = tmp_path / "store"
    with pytest.raises(sigterm.Terminated) as stop:  # the 4th batch of epoch 1: it is finished and kept
        _save(store, CountingTeacher(lambda c: c == 6 + 4 and os.kill(os.getpid(), signal.SIGTERM)))
    assert stop.value.where == "epoch 1 rank 0: 32 of 48 records saved; the same command resumes there"
    assert not sigterm.requested() and not sigterm.installed()
    _resumed(store, whole, 4)


def test_sigterm_while_the_last_shard_is_closed_keeps_the_whole_store(tmp_path, whole, monkeypatch):
    import vitfast.tinyvit.train as train

    close = train.ShardWriter.close

    def signalled_close(self):
        if self.epoch == EPOCHS - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return close(self)

    monkeypatch.setattr(train.ShardWriter, "close", signalled_close)
    store = tmp_path / "store"
    with pytest.raises(sigterm.Terminated) as stop:
        _save(store, CountingTeacher())
    assert stop.value.where == "after the last shard was written"
    assert _files(store) == whole


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_ctrl_c_or_an_error_keeps_the_batches_handed_over(tmp_path, whole, error):
    """The 5th batch of epoch 1 raises in the teacher: batches 1-3 were handed to the writer, the
    4th waits for the 5th's launch (the GPU overlaps them) and is computed again."""
    def act(call):
        if call == 6 + 5:
            raise error("stop")

    store = tmp_path / "store"
    with pytest.raises(error):
        _save(store, CountingTeacher(act))
    _resumed(store, whole, 3)


KILLED = textwrap.dedent("""
    import json, os, signal, sys, time
    sys.path.insert(0, sys.argv[2])
    from test_save_logits_resume import CountingTeacher, _save

    progress = os.path.join(sys.argv[1], "epoch_0001", "rank_0000.vfl.tmp.progress")

    def act(call):  # killed outright (no handler, no suspend) in epoch 1's 5th batch, once the
        if call == 6 + 5:  # writer's thread has checkpointed the 3 batches handed to it
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    if json.load(open(progress))["batches"] == 3:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.01)
            with open(progress + ".tmp", "w") as f:  # as if killed while replacing it
                f.write('{"batches": 4')
            os.kill(os.getpid(), signal.SIGKILL)

    _save(sys.argv[1], CountingTeacher(act), checkpoint_seconds=0.0)  # a checkpoint after every batch
""")


def test_a_killed_writer_resumes_at_its_last_timed_checkpoint(tmp_path, whole):
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(store), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (store / "epoch_0001" / "rank_0000.vfl.tmp.progress").exists()
    _resumed(store, whole, 3)


SIGNALLED_CLI = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    import vitfast.cli as cli
    import vitfast.tinyvit.cli as tcli
    from test_save_logits_resume import CountingTeacher

    def act(call):  # announce, then slow down so that the signal lands within the epoch
        if call == 2:
            print("working", flush=True)
        if call > 2:
            time.sleep(10)

    tcli._teacher = lambda args: (CountingTeacher(act), "vitfast_digits_vit")
    sys.exit(cli.main(["tinyvit", "save-logits", "--out", sys.argv[1], "--epochs", "1", "--device", "cpu"]))
""")


def test_the_command_line_says_what_sigterm_kept(tmp_path):
    from test_interrupt import _interrupted

    store = tmp_path / "store"
    rc, err = _interrupted([sys.executable, "-c", SIGNALLED_CLI, str(store), os.path.dirname(__file__)],
                           lambda p: p.stdout.readline().strip() == "working", sig=signal.SIGTERM)
    assert rc == 143 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    import re

    assert len(lines) == 1 and re.fullmatch(r"vitfast: stopped by SIGTERM \(epoch 0 rank 0: \d+ of \d+ records "
                                            r"saved; the same command resumes there\)", lines[0]), err
    assert (store / "epoch_0000" / "rank_0000.vfl.tmp.progress").exists()


def test_what_a_larger_earlier_run_left_is_removed(tmp_path, whole, monkeypatch):
    """A 2-rank job: rank 0 wrote its shards, rank 1 stopped within epoch 0 and left its .tmp, its
    progress file and (killed while replacing it) a torn one. A 1-rank run never writes rank 1: it
    removes all of them, says so, and the store ends byte for byte like an uninterrupted 1-rank
    run's. Such leftovers beside an epoch that is complete already go too."""
    import shutil

    import vitfast.distributed as vdist
    from vitfast.tinyvit.store import StoreError

    def stops(call):
        if call == 3:
            raise RuntimeError("stop")

    store = tmp_path / "store"
    with monkeypatch.context() as m:
        m.setattr(vdist, "barrier", lambda: None)
        m.setattr(vdist, "rank_world", lambda: (0, 2))
        with pytest.raises(StoreError, match="incomplete"):  # rank 1's shards are missing
            _save(store, CountingTeacher())
        m.setattr(vdist, "rank_world", lambda: (1, 2))
        with pytest.raises(RuntimeError, match="stop"):
            _save(store, CountingTeacher(stops))
    left = store / "epoch_0000"
    names = ["rank_0001.vfl.tmp", "rank_0001.vfl.tmp.progress", "rank_0001.vfl.tmp.progress.tmp"]
    (left / names[2]).write_text('{"batches": 2')
    assert all((left / n).exists() for n in names)
    lines = []
    _save(store, CountingTeacher(), log=lines.append)
    assert _files(store) == whole
    assert [f"save-logits: epoch 0: removed {n} of an earlier run with more ranks" for n in names] == \
        [line for line in lines if "removed" in line], lines

    planted = ["rank_0003.vfl.tmp", "rank_0003.vfl.tmp.progress"]
    for n, source in zip(planted, names):
        (left / source).write_text("left behind")
        shutil.move(str(left / source), str(store / "epoch_0001" / n))
    lines = []
    _save(store, CountingTeacher(), log=lines.append)
    assert _files(store) == whole
    assert "save-logits: epoch 1 already complete, skipped" in lines
    assert [f"save-logits: epoch 1: removed {n} of an earlier run with more ranks" for n in planted] == \
        [line for line in lines if "removed" in line], lines


def test_the_command_line_sets_how_often_a_shard_is_checkpointed(tmp_path, monkeypatch, capsys):
    """--checkpoint-seconds reaches save_logits (default 60); a negative or NaN value is refused
    by name before the teacher is loaded."""
    import vitfast.tinyvit.train as train
    from vitfast.cli import main

    seen = []
    monkeypatch.setattr(train, "save_logits", lambda *args, **kwargs: seen.append(kwargs["checkpoint_seconds"]))
    for extra in ([], ["--checkpoint-seconds", "0"], ["--checkpoint-seconds", "2.5"]):
        assert main(["tinyvit", "save-logits", "--out", str(tmp_path / "s"), "--epochs", "1", "--device", "cpu",
                     "--no-progress", *extra]) == 0
    assert seen == [60.0, 0.0, 2.5]
    for bad in ("-1", "nan"):
        assert main(["tinyvit", "save-logits", "--out", str(tmp_path / "s"), "--checkpoint-seconds", bad]) == 2
        assert f"argument --checkpoint-seconds must be >= 0, got {float(bad)}" in capsys.readouterr().err
