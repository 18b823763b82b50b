"""`vitfast minivit` end to end on CPU: the embedded default's ablation (short), and a tiny timm Swin
teacher from a safetensors checkpoint on an ImageFolder of PNG files through the whole Swin path --
killed mid-run and resumed (with another --workers) to the same bits as an uninterrupted run, a
changed configuration refused with one line, user mistakes answered with one line."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vitfast.minivit import load_mini

SWIN = ["--teacher", "swin_tiny_patch4_window7_224", "--model-kwargs", "img_size=32", "window_size=4",
        "embed_dim=16", "depths=(2,2)", "num_heads=(2,4)"]


def vitfast(*args, timeout=900, wait=True):
    cmd = [sys.executable, "-m", "vitfast", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def folder_and_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("minivit")
    rng = np.random.default_rng(0)
    data = root / "data"
    for c in range(3):  # three classes of 12 coloured-noise images
        (data / f"class{c}").mkdir(parents=True)
        for i in range(12):
            img = (rng.random((32, 32, 3)) * 80 + 60 * c).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(data / f"class{c}" / f"{i}.png")
    torch.manual_seed(0)
    teacher = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16,
                                depths=(2, 2), num_heads=(2, 4), num_classes=3)
    ckpt = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(ckpt))
    return str(data), str(ckpt), root


def swin_args(data, ckpt, out, epochs=2, extra=()):
    return ["minivit", *SWIN, "--num-classes", "3", "--checkpoint", ckpt, "--data", data, "--eval-data", data,
            "--share", "stage", "--epochs", str(epochs), "--batch-size", "8", "--workers", "0", "--input-size", "32",
            "--aa", "none", "--reprob", "0", "--output", out, "--no-progress", *extra]


def test_embedded_default_ablation_short(tmp_path):
    out = str(tmp_path / "ab")
    p = vitfast("minivit", "--epochs", "1", "--seeds", "1", "--output", out, "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    names = list(report["rows"])
    assert names[0] == "original" and len(names) == 1 + 4 * 2  # 4 variants x 2 sharing degrees
    assert all(0 <= a <= 1 for r in report["rows"].values() for a in r["top1"])
    assert report["rows"]["sharing only [share all]"]["params"] < report["rows"]["sharing only [share 2]"]["params"]
    assert set(report["init"]) == {"2/first", "2/mean", "all/first", "all/mean"}
    md = open(os.path.join(out, "report.md")).read()
    assert "Full method vs plain weight sharing" in md and os.path.exists(os.path.join(out, "training_curves.png"))
    mini = load_mini(os.path.join(out, "mini_model"))
    assert mini(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    # every run kept its log and timm-style summary
    run = os.path.join(out, "runs", "share_2", "relation_distillation_full", "seed0")
    assert os.path.exists(os.path.join(run, "summary.csv")) and os.path.exists(os.path.join(run, "log.txt"))


def test_input_size_comes_from_the_model_and_a_refusal_does_not_block_the_corrected_run(folder_and_teacher):
    """A teacher built for 32 x 32 (--model-kwargs img_size=32; timm's pretrained_cfg still says
    224) trains and reports without --input-size or --eval-data; an --input-size it cannot take is
    refused up front; an argument refused once the run had started (--layer-pairs is checked
    against the model) leaves no run record, so the corrected command runs in the same folder."""
    data, ckpt, root = folder_and_teacher
    out = str(root / "sized")
    base = ["minivit", *SWIN, "--num-classes", "3", "--checkpoint", ckpt, "--data", data, "--share", "stage",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--aa", "none", "--reprob", "0", "--output", out,
            "--no-progress"]
    p = vitfast(*base, "--input-size", "64")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-3000:]
    assert "--input-size 64x64" in p.stderr and "32x32" in p.stderr
    p = vitfast(*base, "--layer-pairs", "9:9")
    assert p.returncode == 2 and "layer 9" in p.stderr, p.stderr[-3000:]
    assert not os.path.exists(os.path.join(out, "run.json"))
    p = vitfast(*base)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["comparison"]["mini"]["macs"] > 0 and report["comparison"]["original"]["images_per_s"] > 0
    assert os.path.exists(os.path.join(out, "run.json"))


def test_swin_imagefolder_kill_resume_and_refusal(folder_and_teacher):
    data, ckpt, root = folder_and_teacher
    ref = str(root / "ref")
    p = vitfast(*swin_args(data, ckpt, ref, epochs=3))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Accuracy measured on --eval-data" in open(os.path.join(ref, "report.md")).read()

    # killed at random moments (start-up, an epoch, a checkpoint write, the report), restarted each time
    import random

    from conftest import SEED

    rng = random.Random(SEED)
    killed = str(root / "killed")
    for _ in range(3):
        if os.path.exists(os.path.join(killed, "report.md")):
            break
        proc = vitfast(*swin_args(data, ckpt, killed, epochs=3), wait=False)
        time.sleep(rng.uniform(1.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # finished with a data-loader worker (the others loaded in the main process): each sample is
    # augmented under its own seed (random crops and flips here), so the worker count changes nothing
    p = vitfast(*swin_args(data, ckpt, killed, epochs=3, extra=("--workers", "1")))
    assert p.returncode == 0, p.stderr[-3000:]
    a = load_file(os.path.join(ref, "mini_model", "model.safetensors"))
    b = load_file(os.path.join(killed, "mini_model", "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit

    # the same folder with another configuration: one line, exit 2, nothing overwritten
    p = vitfast(*swin_args(data, ckpt, killed, epochs=3, extra=("--lr", "1e-2")))
    assert p.returncode == 2 and "lr" in p.stderr and "--output" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    mini = load_mini(os.path.join(killed, "mini_model"))
    assert mini(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("args,words", [
    (["--teacher", "swin_tiny_patch4_windw7_224", "--data", "X"], "did you mean swin_tiny_patch4_window7_224"),
    (["--teacher", "vit_tiny_patch16_224"], "both --teacher and --data"),
    (["--share", "0,2;1,3"], "consecutive"),
    (["--epochs", "0"], "--epochs"),
    (["--alpha", "1.5"], "--alpha"),
])
def test_user_mistakes_get_one_line(tmp_path, args, words):
    p = vitfast("minivit", *args, "--output", str(tmp_path / "o"), "--no-ablation")
    assert p.returncode == 2, p.stderr[-2000:]
    assert words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_missing_folder_and_wrong_checkpoint(folder_and_teacher, tmp_path):
    data, ckpt, _ = folder_and_teacher
    p = vitfast(*swin_args(str(tmp_path / "nope"), ckpt, str(tmp_path / "o1")))
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = vitfast(*[a if a != "3" else "5" for a in swin_args(data, ckpt, str(tmp_path / "o2"))])
    assert p.returncode == 2 and "3-class head" in p.stderr and "--num-classes 3" in p.stderr


def test_randaugment_posterize_zero_bits_no_longer_crashes():
    """timm's 'inc1' RandAugment draws posterize(bits=0) now and then; Pillow 13 refuses it.
    vitfast's training transforms install the fix: 0 bits kept = a black image (Pillow <= 12)."""
    from timm.data import auto_augment

    from vitfast.data.augment import install_posterize_fix

    install_posterize_fix()
    img = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    black = auto_augment.NAME_TO_OP["PosterizeIncreasing"](img, 0)
    assert np.asarray(black).max() == 0
    tf = auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", {"translate_const": 10})
    for _ in range(3000):  # 4 of 3,000 draws failed before
        tf(img)


def test_predictions_from_a_tinyvit_store(tmp_path):
    """--store: the prediction term reads a TinyViT logit store (images replayed with the store's
    augmentation); with no relation losses the teacher never runs in training, with them it runs
    for the relations only."""
    from dataclasses import replace

    from vitfast.cli import main
    from vitfast.errors import UserError
    from vitfast.minivit.pipeline import digits_config, load_data, load_teacher, train_mini

    store = str(tmp_path / "store")
    assert main(["tinyvit", "save-logits", "--out", store, "--epochs", "1", "--device", "cpu"]) == 0
    calls = []
    for attn, out in ((0.0, "logits_only"), (1.0, "with_relations")):
        cfg = digits_config(store=store, attn_weight=attn, hidden_weight=0.0, device="cpu", progress=False,
                            train=replace(digits_config().train, epochs=1))
        teacher, name, kwargs = load_teacher(cfg)
        calls.clear()
        # (the Mini model is built from a copy of the teacher, hooks included: count the teacher only)
        teacher.register_forward_pre_hook(lambda m, a, t=teacher: calls.append(1) if m is t else None)
        dataset, eval_batches, _ = load_data(cfg, teacher)
        res = train_mini(cfg, teacher, name, kwargs, dataset, eval_batches, str(tmp_path / out))
        assert res["eval_top1"] > 0.7 and "train_kd" in res["history"][-1]  # 1 epoch: ~0.86 measured
        assert (len(calls) > 0) == (attn > 0), (attn, len(calls))
    with pytest.raises(UserError, match="--store feeds the prediction"):
        digits_config(store=store, alpha=1.0).validate()


@pytest.mark.slow
def test_torchrun_two_processes_swin(folder_and_teacher, tmp_path):
    """`torchrun -m vitfast minivit` (2 CPU processes, gloo DDP): the Swin path with relations on
    the ImageFolder trains, one Mini model and one report come from rank 0, and it loads."""
    data, ckpt, _ = folder_and_teacher
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vitfast", *swin_args(data, ckpt, out, epochs=2)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    assert len(report["history"]) == 2 and "train_attn_rel" in report["history"][-1]
    mini = load_mini(os.path.join(out, "mini_model"))
    assert mini(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_relation_impl_option_reaches_the_config_and_is_checked():
    """--relation-impl maps onto MiniViTConfig (a speed/memory choice: not part of a run's
    identity, so a resume may switch it); anything else is refused by name."""
    import argparse

    from vitfast.errors import UserError
    from vitfast.minivit.cli import add_parser, config_from_args
    from vitfast.minivit.pipeline import MiniViTConfig

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    for impl in ("fused", "chunked", "autograd"):
        a = parser.parse_args(["minivit", "--relation-impl", impl, "--no-ablation"])
        assert config_from_args(a).relation_impl == impl
    assert MiniViTConfig().relation_impl == "fused"
    with pytest.raises(UserError, match="--relation-impl"):
        MiniViTConfig(relation_impl="flash").validate()
    with pytest.raises(SystemExit):
        parser.parse_args(["minivit", "--relation-impl", "flash"])


def _save_swin(path, seed, classes=3, embed_dim=24, depths=(2, 4)):
    torch.manual_seed(seed)
    model = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=embed_dim,
                              depths=depths, num_heads=(2, 4), num_classes=classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_distilled_from_another_teacher(folder_and_teacher, tmp_path):
    """--distill-teacher: the official Mini-Swin recipe distils every size from a bigger Swin. The
    Mini model of the 2+2-layer Swin learns from a wider 2+4-layer one (layer pairs by relative
    depth), the run's identity holds the teacher's weights, and a teacher that cannot serve (other
    classes, another image size, options without the teacher) is refused in one line."""
    data, ckpt, root = folder_and_teacher
    big_kwargs = ["img_size=32", "window_size=4", "embed_dim=24", "depths=(2,4)", "num_heads=(2,4)"]

    def big(weights, *more):
        return ["--share", "2", "--distill-teacher", "swin_tiny_patch4_window7_224", "--distill-checkpoint", weights,
                "--distill-model-kwargs", *big_kwargs, *more]

    out = str(tmp_path / "from_big")
    p = vitfast(*swin_args(data, ckpt, out, epochs=1, extra=big(_save_swin(root / "big.safetensors", 1))))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["distilled_from"] == "swin_tiny_patch4_window7_224"
    assert [tuple(p) for p in report["pairs"]] == [(1, 1), (3, 5)]
    assert "distilled from swin_tiny_patch4_window7_224" in open(os.path.join(out, "report.md")).read()
    assert load_mini(os.path.join(out, "mini_model"))(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    # the same folder with another teacher's weights: another run
    p = vitfast(*swin_args(data, ckpt, out, epochs=1, extra=big(_save_swin(root / "big_b.safetensors", 2))))
    assert p.returncode == 2 and "distill_checkpoint" in p.stderr, p.stderr[-2000:]

    five = _save_swin(root / "big5.safetensors", 3, classes=5)
    for name, extra, words in (("classes", big(five, "num_classes=5"), "5 classes, the model to compress 3"),
                               ("size", big(_save_swin(root / "big.safetensors", 1), "img_size=64"),
                                "it takes 64x64 images, the model to compress 32x32"),
                               ("alone", ["--distill-checkpoint", five], "give --distill-teacher too")):
        bad = str(tmp_path / f"bad_{name}")
        p = vitfast(*swin_args(data, ckpt, bad, epochs=1, extra=extra))
        assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
        assert not os.path.exists(os.path.join(bad, "run.json"))


def test_layer_pairs_with_other_tokens_are_refused_before_training(tmp_path):
    """A teacher with 4x4 patches (65 tokens) for a student with 8x8 ones (17): refused up front by
    one blank image through both, naming the layer pair, and no hooks are left on the caller's
    teacher."""
    from vitfast.minivit.pipeline import MiniViTConfig, train_mini
    from vitfast.errors import UserError

    def vit(patch, depth, width):
        return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=patch, depth=depth, embed_dim=width,
                                 num_heads=3, num_classes=3).eval()

    original, other = vit(8, 2, 48), vit(4, 4, 96)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    cfg = MiniViTConfig(teacher="vit_tiny_patch16_224", data="unused", batch_size=4, workers=0, aa=None, reprob=0.0,
                        mixup=0.0, cutmix=0.0, device="cpu", progress=False, distill_teacher="vit_tiny_patch16_224")
    with pytest.raises(UserError, match=r"layer pair 1:3: the student's layer 1 gives 1 window\(s\) of 17 tokens, "
                                        r"the teacher's layer 3 1 of 65"):
        train_mini(cfg, original, "vit_tiny_patch16_224", {}, data, None, str(tmp_path / "o"), distill_teacher=other)
    assert not any(m._forward_hooks for m in other.modules())
    assert not os.path.exists(tmp_path / "o" / "run.json")


def test_distillation_alone_trains_on_unlabeled_images(folder_and_teacher, tmp_path):
    """--alpha 0 (the default) has no label loss: a plain folder of images is read as unlabeled
    images (the log says so), and so are folders that are not the teacher's classes with
    --unlabeled (without it they are refused: most likely the wrong folder); --eval-data is then
    matched to the head's outputs in order. With a label loss such data is refused in one line
    that names the way out, and no --output folder is left behind."""
    import shutil

    data, ckpt, root = folder_and_teacher
    flat = tmp_path / "flat"
    flat.mkdir()
    for c in sorted(os.listdir(data)):
        for f in sorted(os.listdir(os.path.join(data, c)))[:4]:
            shutil.copy(os.path.join(data, c, f), flat / f"{c}_{f}")
    two = tmp_path / "two"  # two folders, the teacher has three classes
    shutil.copytree(os.path.join(data, "class0"), two / "a")
    shutil.copytree(os.path.join(data, "class1"), two / "b")
    p = vitfast(*swin_args(str(two), ckpt, str(tmp_path / "refused"), epochs=1))
    assert p.returncode == 2 and "--data has 2 classes, the teacher's head 3" in p.stderr and "--unlabeled" in p.stderr
    for folder, images, extra in ((flat, 12, ()), (two, 24, ("--unlabeled",))):
        out = str(tmp_path / f"out_{folder.name}")
        args = swin_args(str(folder), ckpt, out, epochs=1, extra=extra)
        args[args.index("--eval-data") + 1] = data  # labeled: one folder per output of the head
        p = vitfast(*args)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"{images} unlabeled training images" in p.stdout
        assert 0 <= json.load(open(os.path.join(out, "report.json")))["history"][-1]["eval_top1"] <= 1
    out = str(tmp_path / "labels")
    p = vitfast(*swin_args(str(flat), ckpt, out, epochs=1, extra=("--alpha", "0.5")))
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-3000:]
    assert "has no class folders" in p.stderr and "--alpha 0: distillation alone needs no labels" in p.stderr
    p = vitfast(*swin_args(str(two), ckpt, out, epochs=1, extra=("--alpha", "0.5")))
    assert p.returncode == 2 and "--data has 2 classes, the teacher's head 3" in p.stderr, p.stderr[-3000:]
    p = vitfast(*swin_args(str(two), ckpt, out, epochs=1, extra=("--alpha", "0.5", "--unlabeled")))
    assert p.returncode == 2 and "--unlabeled reads --data without labels: it needs --data and --alpha 0" in p.stderr
    assert not os.path.exists(out)


def test_a_finished_mini_model_trains_on_from_init_from(folder_and_teacher, tmp_path):
    """--init-from: a new run starts from a saved Mini model (the weights the first run ended
    with, not the teacher's); more --epochs on the finished run are refused with that way on; a
    saved model of another structure is refused naming the difference; the saved weights are part
    of the run's identity."""
    from vitfast.minivit.multiplex import multiplex
    from vitfast.minivit.pipeline import start_from_saved

    data, ckpt, root = folder_and_teacher
    first = str(tmp_path / "first")
    p = vitfast(*swin_args(data, ckpt, first, epochs=1))
    assert p.returncode == 0, p.stderr[-3000:]
    saved = os.path.join(first, "mini_model")
    p = vitfast(*swin_args(data, ckpt, first, epochs=2))
    assert p.returncode == 2 and f"--init-from {saved} --output NEW" in p.stderr, p.stderr[-2000:]
    # the weights loaded are the saved ones (the teacher's multiplexed weights differ from them)
    teacher = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16,
                                depths=(2, 2), num_heads=(2, 4), num_classes=3)
    teacher.load_state_dict(load_file(ckpt))
    built = multiplex(teacher, "stage")
    start_from_saved(built, saved)
    mini = load_mini(saved)
    assert all(torch.equal(v, mini.state_dict()[k]) for k, v in built.state_dict().items())
    assert not all(torch.equal(v, multiplex(teacher, "stage").state_dict()[k]) for k, v in built.state_dict().items())
    second = str(tmp_path / "second")
    p = vitfast(*swin_args(data, ckpt, second, epochs=1, extra=("--init-from", saved)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.load(open(os.path.join(second, "run.json")))["identity"]["init_from"]
    p = vitfast(*swin_args(data, ckpt, str(tmp_path / "third"), epochs=1, extra=("--init-from", saved, "--no-head-mix")))
    assert p.returncode == 2 and "its heads_mix is True, the Mini model built here has False" in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / "third")
    p = vitfast(*swin_args(data, ckpt, str(tmp_path / "fourth"), epochs=1, extra=("--init-from", first)))
    assert p.returncode == 2 and "holds no structure.json: not a saved Mini model" in p.stderr, p.stderr
