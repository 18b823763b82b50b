"""Progress output: tqdm's bar on a terminal, plain lines in a log file, nothing when disabled;
the iterable is iterated once in every mode."""
import io

import pytest

from vitfast.errors import UserError
from vitfast.progress import MODE_ENV, INTERVAL_ENV, mode, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


class Counted:
    """An iterable that counts the iterators made of it (a DataLoader starts workers per iterator)."""

    def __init__(self, n):
        self.n, self.iters = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        self.iters += 1
        return iter(range(self.n))


def test_mode_follows_the_stream_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv(MODE_ENV, raising=False)
    assert mode(Terminal()) == "bar"
    assert mode(io.StringIO()) == "lines"
    for value in ("bar", "lines", "off", " Lines "):
        monkeypatch.setenv(MODE_ENV, value)
        assert mode(Terminal()) == mode(io.StringIO()) == value.strip().lower()
    monkeypatch.setenv(MODE_ENV, "fancy")
    with pytest.raises(UserError, match=f"{MODE_ENV} must be one of bar, lines, off, got 'fancy'"):
        mode(io.StringIO())


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_bad_interval_is_named(monkeypatch, value):
    monkeypatch.delenv(MODE_ENV, raising=False)
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(UserError, match=f"{INTERVAL_ENV} must be a positive number of seconds, got '{value}'"):
        progress(range(3), stream=io.StringIO())


def test_a_log_file_gets_whole_lines_ending_at_the_total(monkeypatch):
    monkeypatch.delenv(MODE_ENV, raising=False)
    monkeypatch.setenv(INTERVAL_ENV, "1e-9")  # every update is due: one line each
    log = io.StringIO()
    items = Counted(5)
    assert list(progress(items, desc="collect", stream=log, leave=False)) == list(range(5))
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert all(line.startswith("collect:") and line == line.rstrip() for line in lines)
    # one line per count (none before the first interval); the end kept although leave=False (the
    # log says where it ended), once
    assert [f"{i}/5" in line for i, line in enumerate(lines, 1)] == [True] * 5, lines
    assert "100%" in lines[-1]
    assert items.iters == 1


def test_a_log_file_gets_a_line_per_interval_and_none_for_a_short_loop(monkeypatch):
    import time

    monkeypatch.delenv(MODE_ENV, raising=False)
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    log = io.StringIO()
    bar = progress(total=1000, desc="AAFM sensitivity", stream=log, leave=False)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert log.getvalue() == ""  # far shorter than 30 s: the pipeline's own log lines say enough
    monkeypatch.setenv(INTERVAL_ENV, "0.2")
    log = io.StringIO()
    bar = progress(total=8, desc="GFM 1/30", stream=log, leave=False)
    for _ in range(8):
        time.sleep(0.1)
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    # ~0.8 s: a line at most every 0.2 s once 0.2 s have passed, and the end (a slow machine: more)
    assert 2 <= len(lines) <= 8 and "8/8" in lines[-1] and "0/8" not in log.getvalue(), lines


def test_a_terminal_gets_the_bar_and_disabled_gets_nothing(monkeypatch):
    monkeypatch.delenv(MODE_ENV, raising=False)
    term = Terminal()
    items = Counted(4)
    assert list(progress(items, desc="epoch 1/2", stream=term, leave=False)) == list(range(4))
    assert "\r" in term.getvalue() and "epoch 1/2" in term.getvalue()
    assert items.iters == 1
    for stream in (Terminal(), io.StringIO()):
        items = Counted(3)
        assert list(progress(items, stream=stream, enabled=False)) == [0, 1, 2]
        assert stream.getvalue() == "" and items.iters == 1
    monkeypatch.setenv(MODE_ENV, "off")
    term = Terminal()
    assert list(progress(range(3), stream=term)) == [0, 1, 2] and term.getvalue() == ""


def test_every_command_takes_no_progress():
    from vitfast.cli import build_parser

    parser = build_parser()
    for argv in (["lowrank"], ["minivit"], ["tinyvit", "distill", "--out", "x"],
                 ["tinyvit", "save-logits", "--out", "x"]):
        assert parser.parse_args(argv).progress is True, argv
        assert parser.parse_args(argv + ["--no-progress"]).progress is False, argv


def test_a_logged_run_writes_lines_and_no_progress_writes_none(tmp_path):
    """save-logits on the embedded default, stderr a file as under nohup."""
    import os
    import subprocess
    import sys

    def run(out, *extra):
        env = {**os.environ, INTERVAL_ENV: "1e-9"}
        env.pop(MODE_ENV, None)
        done = subprocess.run([sys.executable, "-m", "vitfast", "tinyvit", "save-logits", "--out", str(tmp_path / out),
                               "--epochs", "1", "--workers", "0", *extra], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    logged = run("a")
    bars = [line for line in logged.splitlines() if line.startswith("save-logits epoch 0:")]
    assert "\r" not in logged and len(bars) >= 2 and "100%" in bars[-1], logged
    assert "save-logits epoch" not in run("b", "--no-progress")


def test_a_bad_environment_fails_before_the_command_runs(tmp_path, monkeypatch, capsys):
    from vitfast.cli import main

    for name, value in ((MODE_ENV, "quiet"), (INTERVAL_ENV, "0")):
        monkeypatch.setenv(MODE_ENV, "lines")
        monkeypatch.setenv(INTERVAL_ENV, "30")
        monkeypatch.setenv(name, value)
        assert main(["tinyvit", "save-logits", "--out", str(tmp_path / "store"), "--epochs", "1"]) == 2
        assert f"vitfast: environment variable {name} must be" in capsys.readouterr().err
        assert not (tmp_path / "store").exists()
