"""Ctrl-C (SIGINT) ends a command with one line and exit status 130, not a traceback from wherever
the run was: it says whether the same command resumes, and a run that saved nothing forgets its
record and the folders it made (the corrected command is not refused as another configuration)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

# `vitfast lowrank` on the embedded default up to its run record, then a stand-in for the work
# that runs until interrupted (saving a stage result first when asked to)
SLOW_LOWRANK = textwrap.dedent("""
    import os, sys, time
    import vitfast.lowrank.pipeline as pipeline

    def slow(model, proxy, cfg, out_dir, *args, **kwargs):
        if sys.argv[2] == "save":
            open(os.path.join(out_dir, "search.json"), "w").write("{}")
        print("working", flush=True)
        time.sleep(120)

    pipeline.run_lowrank = slow
    from vitfast.cli import main
    sys.exit(main(["lowrank", "--output", sys.argv[1]]))
""")


def _interrupted(args, ready, sig=signal.SIGINT):
    """Runs `args`, sends `sig` once `ready()` holds, returns (exit status, stderr)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready(proc) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("saves", [False, True])
def test_ctrl_c_ends_a_command_in_one_line(tmp_path, saves):
    out = tmp_path / "new" / "out"
    rc, err = _interrupted([sys.executable, "-c", SLOW_LOWRANK, str(out), "save" if saves else "-"],
                           lambda p: p.stdout.readline().strip() == "working")
    assert rc == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == [
        f"vitfast: interrupted; the same command resumes from what was saved in '{out}'" if saves else
        "vitfast: interrupted; nothing was saved (the run record is dropped: the command may change)"]
    if saves:  # the record keeps guarding what was saved
        assert (out / "run.json").exists() and (out / "search.json").exists()
    else:  # the folders the run made are gone, up to the first that did not exist
        assert not (tmp_path / "new").exists()


def test_ctrl_c_in_a_command_without_a_run_record():
    """save-logits (its finished shards stay), inspect, info: no claim about a run record."""
    script = textwrap.dedent("""
        import sys, time
        import vitfast.cli as cli

        def slow(args):
            print("working", flush=True)
            time.sleep(120)

        cli.cmd_info = slow
        sys.exit(cli.main(["info"]))
    """)
    rc, err = _interrupted([sys.executable, "-c", script], lambda p: p.stdout.readline().strip() == "working")
    assert rc == 130 and err.strip().splitlines() == ["vitfast: interrupted"], err


@pytest.mark.slow
def test_ctrl_c_in_a_real_training_run(tmp_path):
    """The interrupt reaches the command through the training loop (minivit's embedded ablation,
    after its first checkpoint)."""
    out = tmp_path / "out"
    first = out / "runs" / "share_2" / "sharing_only" / "seed0"
    rc, err = _interrupted([sys.executable, "-m", "vitfast", "minivit", "--output", str(out)],
                           lambda p: (first / "checkpoint.safetensors").exists())
    assert rc == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == \
        f"vitfast: interrupted; the same command resumes from what was saved in '{first}'"
    assert (first / "run.json").exists()


@pytest.mark.slow
def test_ctrl_c_before_a_training_run_saved_anything(tmp_path):
    """The Python API's entry points drop the record on the way out (minivit's run_minivit and
    train_mini); the command line still says so."""
    out = tmp_path / "out"
    first = out / "runs" / "share_2" / "sharing_only" / "seed0"
    rc, err = _interrupted([sys.executable, "-m", "vitfast", "minivit", "--output", str(out)],
                           lambda p: (first / "run.json").exists())
    assert rc == 130 and "Traceback" not in err, err
    if (first / "checkpoint.safetensors").exists():  # the first epoch ended before the signal arrived
        pytest.skip("the first epoch ended before the signal arrived")
    assert err.strip().splitlines()[-1] == \
        "vitfast: interrupted; nothing was saved (the run record is dropped: the command may change)"
    assert not out.exists()


# Ctrl-C while `import vitfast` loads torch (seconds): a sitecustomize on PYTHONPATH sends SIGINT
# to the process as the import reaches vitfast.ops
CTRL_C_AT_IMPORT = textwrap.dedent("""
    import importlib.abc, os, signal, sys

    class CtrlC(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "vitfast.ops":
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, CtrlC())
""")


@pytest.mark.parametrize("how", ["console script", "python -m", "a program's import"])
def test_ctrl_c_while_vitfast_is_imported(tmp_path, how):
    """The command ends in one line with status 130; a program that imports vitfast gets its
    KeyboardInterrupt as from any import."""
    (tmp_path / "sitecustomize.py").write_text(CTRL_C_AT_IMPORT)
    script = os.path.join(os.path.dirname(sys.executable), "vitfast")
    if how == "console script" and not os.path.exists(script):
        pytest.skip("no installed console script next to this Python")
    args = {"console script": [script, "info"], "python -m": [sys.executable, "-m", "vitfast", "info"],
            "a program's import": [sys.executable, "-c", "import vitfast"]}[how]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    if how == "a program's import":
        assert proc.returncode in (1, -signal.SIGINT, 130) and "KeyboardInterrupt" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 130 and proc.stderr == "vitfast: interrupted\n", proc.stderr[-3000:]
