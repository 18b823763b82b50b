"""The path a new user takes, end to end on CPU: an ImageFolder of PNG files, a timm teacher with a
10-class head saved as safetensors, and every pipeline on them with timm-style options --
save-logits, verify, distill (streamed evaluation), lowrank, minivit from the store -- each resumed
after a kill, a changed configuration refused in one line, a class-count mismatch refused in one
line."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vitfast.tinyvit import LogitStore

def vitfast(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "vitfast", *args], capture_output=True, text=True, timeout=timeout)


def killed_then_resumed(args, delay: float):
    """Start, SIGKILL after `delay` seconds, start again: the second run must finish."""
    proc = subprocess.Popen([sys.executable, "-m", "vitfast", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return vitfast(*args)


def one_line_refusal(proc, *words):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Digits as PNG files: a 10-class training folder (20 per class), a held-out folder, and a
    3-class folder (the wrong class count)."""
    from vitfast.data import export_digits_imagefolder
    from vitfast.models.digits_vit import ASSET

    root = tmp_path_factory.mktemp("user")
    full = export_digits_imagefolder(str(root / "full"), split="train")
    train, three = root / "train", root / "three"
    for i, c in enumerate(sorted(os.listdir(full))):
        os.makedirs(train / c)
        for f in sorted(os.listdir(os.path.join(full, c)))[:20]:
            shutil.copy(os.path.join(full, c, f), train / c / f)
        if i < 3:
            shutil.copytree(train / c, three / c)
    held_out = export_digits_imagefolder(str(root / "val"), split="test")
    checkpoint = str(root / "teacher.safetensors")
    shutil.copy(ASSET, checkpoint)
    return {"train": str(train), "val": held_out, "three": str(three), "checkpoint": checkpoint, "root": root}


@pytest.mark.slow
def test_every_pipeline_on_an_imagefolder_and_a_checkpoint(folders):
    root, ckpt = folders["root"], folders["checkpoint"]
    teacher = ["--teacher", "vitfast_digits_vit", "--checkpoint", ckpt]
    store = str(root / "store")

    # save-logits: killed and resumed; the store is complete and matches the teacher
    save = ["tinyvit", "save-logits", *teacher, "--data", folders["train"], "--epochs", "3", "--topk", "5",
            "--device", "cpu", "--output", store]
    proc = killed_then_resumed(save, 4.0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert LogitStore(store).complete_epochs() == [0, 1, 2]
    proc = vitfast("tinyvit", "verify", store, *teacher, "--data", folders["train"], "--device", "cpu")
    assert proc.returncode == 0 and "store verified" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    one_line_refusal(vitfast("tinyvit", "save-logits", *teacher, "--data", folders["three"], "--epochs", "1",
                             "--device", "cpu", "--output", str(root / "store3")), "10 classes", "--data 3")
    assert not os.path.exists(root / "store3" / "store.json")

    # distill a timm student from the store, evaluation streamed from the held-out folder
    distill = ["tinyvit", "distill", "--model", "vitfast_digits_vit", "--store", store, "--data", folders["train"],
               "--eval-data", folders["val"], "--epochs", "2", "--batch-size", "32", "--device", "cpu",
               "--output", str(root / "student")]
    proc = killed_then_resumed(distill, 6.0)
    assert proc.returncode == 0 and "held-out accuracy" in proc.stdout, proc.stderr[-2000:]
    changed = distill[:distill.index("--epochs") + 1] + ["3"] + distill[distill.index("--epochs") + 2:]
    one_line_refusal(vitfast(*changed), "epochs")

    # lowrank: the same teacher and folders
    lowrank = ["lowrank", "--model", "vitfast_digits_vit", "--checkpoint", ckpt, "--data", folders["train"],
               "--eval-data", folders["val"], "--proxy-size", "200", "--epochs", "1", "--target-params", "0.8",
               "--no-svd-baseline", "--device", "cpu", "--output", str(root / "lowrank")]
    proc = killed_then_resumed(lowrank, 5.0)
    assert proc.returncode == 0 and "Low-rank compression of vitfast_digits_vit" in proc.stdout, proc.stderr[-2000:]
    one_line_refusal(vitfast(*[("0.7" if a == "0.8" else a) for a in lowrank]), "target_params")

    # minivit: predictions from the store (no teacher run), streamed evaluation
    minivit = ["minivit", *teacher, "--data", folders["train"], "--eval-data", folders["val"], "--store", store,
               "--attn-weight", "0", "--hidden-weight", "0", "--epochs", "1", "--batch-size", "32", "--workers", "0",
               "--device", "cpu", "--output", str(root / "mini")]
    proc = killed_then_resumed(minivit, 6.0)
    assert proc.returncode == 0 and os.path.exists(root / "mini" / "mini_model" / "model.safetensors"), \
        proc.stderr[-2000:]
    one_line_refusal(vitfast(*[("2" if a == "1" else a) for a in minivit]), "epochs")
    one_line_refusal(vitfast("minivit", *teacher, "--data", folders["three"], "--epochs", "1", "--device", "cpu",
                             "--output", str(root / "mini3")), "3 classes")
