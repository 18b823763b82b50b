"""Acceptance on the embedded default (the README's main command): the shipped digits teacher
compressed to 67% of its parameters by AAFM + GFM, against weight-SVD with the same ranks."""
import json
import os

import pytest

from vitfast.cli import main


@pytest.mark.slow
def test_embedded_default_acceptance(tmp_path):
    out = str(tmp_path / "lowrank")
    assert main(["lowrank", "--out", out, "--device", "cpu"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    r = report["results"]
    orig = r["original"]
    # 67% of the parameters at most, at most 1 point of held-out accuracy lost
    assert r["aafm+gfm"]["params"] <= 0.67 * orig["params"]
    assert r["aafm+gfm"]["accuracy"] >= orig["accuracy"] - 0.01
    assert r["svd+gfm"]["params"] == pytest.approx(r["aafm+gfm"]["params"], rel=0.01)
    # AAFM beats weight-SVD at the same parameter count: accuracy before GFM, and fidelity to the
    # original (KL) before and after GFM. (After GFM both sit within about one held-out image of
    # the teacher, so accuracy cannot separate them on 359 images.)
    assert r["aafm"]["accuracy"] > r["svd"]["accuracy"]
    assert r["aafm"]["kl_to_original"] < r["svd"]["kl_to_original"]
    assert r["aafm+gfm"]["kl_to_original"] < r["svd+gfm"]["kl_to_original"]
    # Output features need fewer dims for 90% energy than the weights, in every layer (Fig. 1)
    for row in report["energy"]:
        assert row["out_dims90"] < row["weight_dims90"], row
    assert os.path.getsize(os.path.join(out, "energy_and_ranks.png")) > 10_000


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """The pipeline under torchrun (2 CPU processes, gloo): sharded collection merged across
    ranks, search split by layer, GFM in DDP, one set of outputs from rank 0."""
    import subprocess
    import sys

    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitfast",
         "lowrank", "--out", out, "--device", "cpu", "--gfm-epochs", "2", "--target-params", "0.8",
         "--no-svd-baseline"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["world_size"] == 2
    r = report["results"]
    assert r["aafm+gfm"]["params"] <= 0.8 * r["original"]["params"]
    assert r["aafm+gfm"]["accuracy"] >= r["original"]["accuracy"] - 0.01
    search = json.load(open(os.path.join(out, "search.json")))
    assert len(search["layers"]) == 16 and all(layer["sensitivity"] for layer in search["layers"])
    assert proc.stdout.count("Low-rank compression of") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_cli_with_model_checkpoint_and_imagefolder(tmp_path):
    """The user path: a timm model name + a safetensors checkpoint + ImageFolder proxy and eval data."""
    from vitfast.data import export_digits_imagefolder
    from vitfast.models.digits_vit import ASSET

    proxy = export_digits_imagefolder(str(tmp_path / "train"), split="train")
    held_out = export_digits_imagefolder(str(tmp_path / "test"), split="test")
    out = str(tmp_path / "out")
    assert main(["lowrank", "--model", "vitfast_digits_vit", "--checkpoint", ASSET, "--data", proxy, "--eval-data",
                 held_out, "--proxy-size", "500", "--gfm-epochs", "2", "--target-params", "0.8", "--no-svd-baseline",
                 "--device", "cpu", "--out", out]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    r = report["results"]
    assert r["original"]["accuracy"] > 0.95  # PNG round trip of the held-out images keeps the teacher's accuracy
    n_held_out = sum(len(files) for _, _, files in os.walk(held_out))
    assert report["measured_on"] == f"--eval-data '{held_out}' ({n_held_out} images)"  # no overlap note
    assert report["measured_on"] in open(os.path.join(out, "report.md")).read()
    assert r["aafm+gfm"]["params"] <= 0.8 * r["original"]["params"]
    assert r["aafm+gfm"]["accuracy"] >= r["original"]["accuracy"] - 0.02
    import vitfast

    model = vitfast.load_compressed(os.path.join(out, "compressed"))
    assert sum(p.numel() for p in model.parameters()) == r["aafm+gfm"]["params"]


@pytest.mark.slow
def test_kills_at_random_points_resume_bit_exact(tmp_path):
    """`vitfast lowrank` SIGKILLed at random moments (collection, search, GFM, the reports) and
    restarted into the same folder ends with the compressed weights of an uninterrupted run."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from conftest import SEED

    rng = random.Random(SEED)
    cmd = [sys.executable, "-m", "vitfast", "lowrank", "--device", "cpu", "--gfm-epochs", "2", "--no-svd-baseline",
           "--target-params", "0.8"]
    clean = str(tmp_path / "clean")
    subprocess.run(cmd + ["--out", clean], check=True, capture_output=True, timeout=900)
    out = str(tmp_path / "killed")
    weights = os.path.join(out, "compressed", "model.safetensors")
    for _ in range(3):
        if os.path.exists(os.path.join(out, "report.md")):
            break
        proc = subprocess.Popen(cmd + ["--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 20.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = subprocess.run(cmd + ["--out", out], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert open(weights, "rb").read() == open(os.path.join(clean, "compressed", "model.safetensors"), "rb").read()
