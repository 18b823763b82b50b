"""TinyViT distillation: bit-identical replay across world sizes and workers, save/distill
resume after a kill, seeds checked against the store, the TinyViT family's sizes."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch

from vitfast.tinyvit import LogitStore, ReplayAugment, distill, epoch_plan, save_logits
from vitfast.tinyvit.defaults import MIXUP, digits_student, digits_train_set, digits_transform
from vitfast.tinyvit.replay import PairDataset, collate_pairs, rank_slice
from vitfast.tinyvit.store import StoreError, shard_path


def replay_images(dataset, transform, mixup, epoch, world, workers):
    """key -> image for every canonical entry, produced as `world` ranks with `workers` workers."""
    out = {}
    for rank in range(world):
        pairs, canonical = rank_slice(epoch_plan(len(dataset), epoch, 7, world), rank, world)
        loader = torch.utils.data.DataLoader(PairDataset(ReplayAugment(dataset, transform, mixup), pairs, canonical,
                                                         epoch, 7), batch_size=3, num_workers=workers,
                                             collate_fn=collate_pairs)
        for keys, _, canon, images, _ in loader:
            for k, c, x in zip(keys.tolist(), canon.tolist(), images):
                if c:
                    assert k not in out, "a canonical key appeared twice"
                    out[k] = x
    return out


def test_replay_is_bit_identical_across_world_sizes_and_workers():
    ds, _ = digits_train_set()
    ds = torch.utils.data.Subset(ds, range(101))  # odd size: exercises the padding rule
    a = replay_images(ds, digits_transform(), MIXUP, 3, world=2, workers=0)
    b = replay_images(ds, digits_transform(), MIXUP, 3, world=1, workers=2)
    c = replay_images(ds, digits_transform(), MIXUP, 3, world=3, workers=1)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(101))
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])
    d = replay_images(ds, digits_transform(), MIXUP, 4, world=1, workers=0)
    assert not torch.equal(a[0], d[0])  # another epoch, another augmentation


def test_a_pair_draws_what_its_seeds_draw_and_leaves_the_callers_rng_alone():
    """pair() saves and restores the RNG states once for its three seeded steps: the images equal
    those drawn one seed at a time (image()), the mix is the pair seed's, and the caller's Python,
    NumPy and torch streams continue as if nothing had run."""
    import random

    from timm.data import Mixup

    from vitfast.tinyvit.replay import seeded

    ds, _ = digits_train_set()
    aug = ReplayAugment(ds, digits_transform(), MIXUP)
    seeds = [1234567, 89]
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    x, t = aug.pair([3, 8], seeds, num_classes=10)
    after = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    assert after == (random.random(), np.random.rand(), torch.rand(1))
    a, la = aug.image(3, seeds[0])
    b, lb = aug.image(8, seeds[1])
    with seeded(seeds[0] ^ seeds[1]):
        want, want_t = Mixup(**{**MIXUP, "mode": "batch"})(torch.stack([a, b]), torch.tensor([la, lb]))
    assert torch.equal(x, want) and torch.equal(t, want_t)


def test_replay_with_stock_timm_imagenet_transforms(tmp_path):
    """RandomResizedCrop + flip + RandAugment + RandomErasing (timm.create_transform) and
    Mixup/CutMix, on PIL images from an ImageFolder."""
    from timm.data import create_transform
    from torchvision import datasets

    from vitfast.data import export_digits_imagefolder

    root = export_digits_imagefolder(str(tmp_path / "imgs"), split="test")
    ds = torch.utils.data.Subset(datasets.ImageFolder(root), range(30))
    tf = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    mix = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5, "num_classes": 10}
    a = replay_images(ds, tf, mix, 0, world=2, workers=2)
    b = replay_images(ds, tf, mix, 0, world=1, workers=0)
    assert all(torch.equal(a[k], b[k]) for k in range(30))


def test_seeded_restores_caller_rng():
    from vitfast.tinyvit import seeded

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(99):
        torch.rand(5)
    assert torch.equal(torch.rand(3), expected)


def small_setup(n=64):
    ds, (te_x, te_y) = digits_train_set()
    return torch.utils.data.Subset(ds, range(n)), (te_x[:100], te_y[:100])


def test_save_logits_kill_and_resume(tmp_path):
    """SIGKILL a save-logits run after its first shard, resume it: finished shards are kept
    untouched, the rest are written, and the store equals an uninterrupted one."""
    store = str(tmp_path / "store")
    base = [sys.executable, "-m", "vitfast", "tinyvit", "save-logits", "--epochs", "6", "--device", "cpu"]
    cmd = base + ["--out", store]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = shard_path(store, 0, 0)
    deadline = time.time() + 300
    while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(first)
    done = {e: os.path.getmtime(shard_path(store, e, 0)) for e in range(6) if os.path.exists(shard_path(store, e, 0))}
    assert len(done) < 6, "the run finished before it could be killed"
    subprocess.run(cmd, check=True, capture_output=True)
    for e, mtime in done.items():
        assert os.path.getmtime(shard_path(store, e, 0)) == mtime  # not rewritten
    clean = str(tmp_path / "clean")
    subprocess.run(base + ["--out", clean], check=True, capture_output=True)
    a, b = LogitStore(store), LogitStore(clean)
    assert a.epochs() == b.epochs() == list(range(6))
    for e in range(6):
        keys = b.keys(e)
        assert np.array_equal(a.keys(e), keys) and len(keys) == 1438
        for x, y in zip(a.lookup(e, keys), b.lookup(e, keys)):
            assert torch.equal(x, y)


def test_distill_resume_matches_uninterrupted_run(tmp_path):
    ds, eval_set = small_setup()
    store = str(tmp_path / "store")
    from vitfast.models.digits_vit import load_digits_teacher

    save_logits(load_digits_teacher(), ds, digits_transform(), store, range(2), k=5, mixup_args=MIXUP,
                progress=False, log=lambda *_: None)

    class Killed(Exception):
        pass

    def die_at_epoch_3(msg):  # raised after epoch 3 is logged, before its checkpoint is written
        if msg.startswith("distill: epoch 3/"):
            raise Killed

    def run(ckpt, log=lambda *_: None):
        torch.manual_seed(0)
        student = digits_student()
        res = distill(student, ds, digits_transform(), store, 4, batch_size=16, checkpoint_dir=ckpt,
                      eval_set=eval_set, progress=False, log=log)
        return student, res

    full, res_full = run(str(tmp_path / "a"))
    with pytest.raises(Killed):
        run(str(tmp_path / "b"), die_at_epoch_3)
    logs = []
    resumed, res_resumed = run(str(tmp_path / "b"), logs.append)
    assert "distill: resuming after epoch 2/4" in logs
    assert [h["train_loss"] for h in res_full["history"]] == pytest.approx(
        [h["train_loss"] for h in res_resumed["history"]])
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q)
    assert len(res_full["history"]) == 4 and "eval_accuracy" in res_full["history"][-1]


def test_loader_workers_change_nothing(tmp_path):
    """Records looked up in data-loader workers (a pickled store) and the pipelined save give
    the same store and the same trained student as in-process loading."""
    import pickle

    ds, _ = small_setup(60)
    from vitfast.models.digits_vit import load_digits_teacher

    stores, logs = {}, []
    for workers in (0, 2):
        stores[workers] = str(tmp_path / f"store{workers}")
        save_logits(load_digits_teacher(), ds, digits_transform(), stores[workers], range(1), k=5, mixup_args=MIXUP,
                    workers=workers, progress=False, log=logs.append)
    # each epoch says where its time went: waiting on the data path, or the teacher's
    import re

    for line in logs:
        m = re.search(r"(\d+) records in ([\d.]+)s \(\d+ img/s; waiting for data ([\d.]+)s = (\d+)%, "
                      r"(data|teacher)-bound\)", line)
        assert m and int(m.group(1)) == 60 and float(m.group(3)) <= float(m.group(2)) + 0.05, line
    a, b = LogitStore(stores[0]), LogitStore(stores[2])
    keys = a.keys(0)
    assert np.array_equal(keys, b.keys(0))
    for x, y in zip(a.lookup(0, keys), b.lookup(0, keys)):
        assert torch.equal(x, y)
    copy = pickle.loads(pickle.dumps(a))  # what a spawned worker gets: no open maps, epoch 0 verified
    assert copy._epochs == {} and copy._verified == {0}
    for x, y in zip(a.lookup(0, keys), copy.lookup(0, keys)):
        assert torch.equal(x, y)

    students = {}
    for workers in (0, 2):
        torch.manual_seed(0)
        students[workers] = digits_student()
        distill(students[workers], ds, digits_transform(), stores[0], 2, batch_size=16, workers=workers,
                progress=False, log=lambda *_: None)
    for p, q in zip(students[0].state_dict().values(), students[2].state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_distill_rejects_a_store_for_other_data(tmp_path):
    ds, _ = small_setup(40)
    store = str(tmp_path / "store")
    from vitfast.models.digits_vit import load_digits_teacher

    save_logits(load_digits_teacher(), ds, digits_transform(), store, range(1), k=5, mixup_args=MIXUP,
                progress=False, log=lambda *_: None)
    other, _ = small_setup(41)
    with pytest.raises(StoreError, match="written for 40 samples"):
        distill(digits_student(), other, digits_transform(), store, 1, progress=False, log=lambda *_: None)
    with pytest.raises(StoreError, match="not a logit store"):
        distill(digits_student(), ds, digits_transform(), str(tmp_path), 1, progress=False)


@pytest.mark.parametrize("name,params", [("tiny_vit_5m_224", 5.39e6), ("tiny_vit_11m_224", 11.00e6),
                                         ("tiny_vit_21m_224", 21.20e6), ("tiny_vit_21m_384", 21.20e6),
                                         ("tiny_vit_21m_512", 21.20e6)])
def test_tinyvit_family_sizes(name, params):
    """The students: timm's TinyViT family, parameter counts as in the paper (1000-class head)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01, n


@pytest.mark.slow
def test_torchrun_save_and_distill_across_world_sizes(tmp_path):
    """save-logits on 2 ranks, then students from that store on 2 ranks and on 1 (DDP on gloo)."""
    store, env = str(tmp_path / "store"), {**os.environ, "OMP_NUM_THREADS": "1"}
    run2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vitfast",
            "tinyvit"]
    subprocess.run(run2 + ["save-logits", "--out", store, "--epochs", "2", "--device", "cpu"], check=True,
                   capture_output=True, env=env, timeout=600)
    s = LogitStore(store)
    assert s.epochs() == [0, 1]
    assert all(len(s.keys(e)) == 1438 for e in (0, 1))  # canonical entries only: no duplicates across ranks
    assert all(os.path.exists(shard_path(store, e, r)) for e in (0, 1) for r in (0, 1))
    for cmd, out in ((run2, "ddp"), ([sys.executable, "-m", "vitfast", "tinyvit"], "single")):
        proc = subprocess.run(cmd + ["distill", "--store", store, "--epochs", "2", "--device", "cpu", "--out",
                                     str(tmp_path / out)], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "held-out accuracy" in proc.stdout
        assert os.path.exists(tmp_path / out / "student.safetensors")

    # rank 1 of epoch 1 lost (a rank that died): every reader names the epoch, one process completes it
    cli = [sys.executable, "-m", "vitfast", "tinyvit"]
    os.remove(shard_path(store, 1, 1))
    proc = subprocess.run(cli + ["inspect", store], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "epoch 1: incomplete: " in proc.stdout and "missing [1]" in proc.stdout
    proc = subprocess.run(cli + ["distill", "--store", store, "--epochs", "1", "--device", "cpu", "--out",
                                 str(tmp_path / "refused")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "incomplete epochs (epoch 1" in proc.stderr, proc.stderr[-2000:]
    proc = subprocess.run(cli + ["verify", store, "--samples", "0"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "epoch 0: 1438 records" in proc.stdout and "epoch 1: FAILED" in proc.stdout
    proc = subprocess.run(cli + ["save-logits", "--out", store, "--epochs", "2", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "epoch 0 already complete" in proc.stdout, proc.stderr[-2000:]
    s = LogitStore(store)
    assert s.complete_epochs() == [0, 1] and len(s.keys(1)) == 1438
    proc = subprocess.run(cli + ["verify", store, "--samples", "8"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "store verified" in proc.stdout, proc.stdout
    # a corrupt record in the last epoch: verify (every epoch by default) fails and names it
    path = shard_path(store, 1, 0)
    data = bytearray(open(path, "rb").read())
    data[64 + 5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    proc = subprocess.run(cli + ["verify", store, "--samples", "8"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "epoch 1: FAILED" in proc.stdout and "is corrupt" in proc.stdout


def kill_at_random_points(cmd, done, rng, kills=3, env=None):
    """Start cmd, SIGKILL it after a random delay, `kills` times (each restart resumes), then
    let it finish. `done()` says whether the run has finished (then no more kills)."""
    for _ in range(kills):
        if done():
            break
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(1.0, 6.0))  # import and start-up take ~1-2 s: some kills land there
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kills_at_random_points_resume_bit_exact(tmp_path):
    """save-logits and distill, each SIGKILLed at random moments and restarted into the same
    folder: the store and the student equal those of uninterrupted runs, byte for byte."""
    import random

    from conftest import SEED

    rng = random.Random(SEED)
    cli = [sys.executable, "-m", "vitfast", "tinyvit"]
    save = cli + ["save-logits", "--epochs", "3", "--device", "cpu"]
    subprocess.run(save + ["--out", str(tmp_path / "clean")], check=True, capture_output=True)
    store = str(tmp_path / "killed")
    kill_at_random_points(save + ["--out", store], lambda: os.path.exists(shard_path(store, 2, 0)), rng)
    a, b = LogitStore(store), LogitStore(str(tmp_path / "clean"))
    assert a.complete_epochs() == b.complete_epochs() == [0, 1, 2]
    for e in range(3):
        assert open(shard_path(store, e, 0), "rb").read() == open(shard_path(str(tmp_path / "clean"), e, 0), "rb").read()

    distill_cmd = cli + ["distill", "--store", store, "--epochs", "3", "--device", "cpu"]
    subprocess.run(distill_cmd + ["--out", str(tmp_path / "d_clean")], check=True, capture_output=True)
    out = str(tmp_path / "d_killed")
    kill_at_random_points(distill_cmd + ["--out", out],
                          lambda: os.path.exists(os.path.join(out, "student.safetensors")), rng)
    assert open(os.path.join(out, "student.safetensors"), "rb").read() == \
        open(tmp_path / "d_clean" / "student.safetensors", "rb").read()


def test_teacher_and_student_built_for_another_size(tmp_path):
    """--model-kwargs on save-logits, verify and distill: a teacher built for 32 x 32 fills a store
    of 32 x 32 images (not timm's 224 from pretrained_cfg); a student built for another size is
    refused in one line that says which (not an assertion at its first step), and nothing it
    wrote blocks the corrected command in the same folder."""
    from small_models import VIT32, random_image_folder, save_vit32

    from vitfast.tinyvit.defaults import store_recipe

    data, ckpt = random_image_folder(tmp_path / "data", per_class=6), save_vit32(tmp_path / "t.safetensors")
    store, out = str(tmp_path / "store"), str(tmp_path / "student")

    def vitfast(*args):
        return subprocess.run([sys.executable, "-m", "vitfast", "tinyvit", *args], capture_output=True, text=True,
                              timeout=600)

    model = ["--teacher", "vit_tiny_patch16_224", "--checkpoint", ckpt, "--num-classes", "2", "--model-kwargs", *VIT32,
             "--data", data]
    p = vitfast("save-logits", *model, "--epochs", "1", "--batch-size", "4", "--out", store, "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert store_recipe(store)["input_size"] == [3, 32, 32]
    p = vitfast("verify", store, *model, "--samples", "4")
    assert p.returncode == 0 and "store verified" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    student = ["distill", "--store", store, "--data", data, "--student", "vit_tiny_patch16_224", "--epochs", "1",
               "--batch-size", "4", "--out", out, "--no-progress"]
    p = vitfast(*student, "--model-kwargs", "img_size=64", "depth=1")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert "--student" in p.stderr and "64x64" in p.stderr and "32x32" in p.stderr
    p = vitfast(*student, "--model-kwargs", "img_size=32", "depth=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nothing to fuse in VisionTransformer" in p.stdout and "Warning" not in p.stderr


def test_distill_starts_the_student_from_a_checkpoint_of_other_classes(tmp_path):
    """distill --checkpoint: a student trained elsewhere (a 5-class head) fine-tunes on 2-class
    data: every weight but the head comes from the file, the head is new (engine.models.create_model
    new_head); the checkpoint is part of the run's identity; without --student it is refused."""
    from safetensors.torch import load_file
    from small_models import VIT32, random_image_folder, save_vit32, vit32_kwargs

    from vitfast.engine.models import create_model

    data, ckpt = random_image_folder(tmp_path / "data", per_class=4), save_vit32(tmp_path / "s5.safetensors", 5)
    file = load_file(ckpt)
    m = create_model("vit_tiny_patch16_224", num_classes=2, checkpoint=ckpt, new_head=True, model_kwargs=vit32_kwargs())
    assert m.vitfast_new_head == 5 and m.head.weight.shape == (2, 48)
    own = m.state_dict()
    assert all(torch.equal(own[k], v) for k, v in file.items() if not k.startswith("head."))
    with pytest.raises(Exception, match="5-class head, the model 2: pass --num-classes 5"):
        create_model("vit_tiny_patch16_224", num_classes=2, checkpoint=ckpt, model_kwargs=vit32_kwargs())

    def distill(*args):
        return subprocess.run([sys.executable, "-m", "vitfast", "tinyvit", "distill", "--labels-only", "--data", data,
                               "--epochs", "1", "--batch-size", "4", "--no-progress", *args],
                              capture_output=True, text=True, timeout=600)

    out = str(tmp_path / "out")
    student = ["--student", "vit_tiny_patch16_224", "--model-kwargs", *VIT32]
    p = distill(*student, "--checkpoint", ckpt, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"the student starts from {ckpt}; its 5-class head replaced by a new 2-class one" in p.stdout
    p = distill(*student, "--checkpoint", ckpt, "--out", out, "--epochs", "2")  # the last --epochs wins
    assert p.returncode == 2 and f"--checkpoint {out}/student.safetensors --output NEW" in p.stderr, p.stderr[-2000:]
    other = save_vit32(tmp_path / "other.safetensors", 5, seed=1)
    p = distill(*student, "--checkpoint", other, "--out", out)
    assert p.returncode == 2 and "identity checkpoint=" in p.stderr, p.stderr[-2000:]
    p = distill("--checkpoint", ckpt, "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "give --student too" in p.stderr and not os.path.exists(tmp_path / "x")


def test_a_store_of_unlabeled_images(tmp_path):
    """TinyViT distils from soft labels only (no ground truth), so save-logits takes a plain folder
    of images (or, with --unlabeled, folders that are not the teacher's classes) as unlabeled
    images: the store says so, distill's student gets the teacher's classes, --eval-data is matched
    to its outputs in order, and the labels-only baseline (which needs labels) is refused in one
    line."""
    import shutil

    from small_models import VIT32, random_image_folder, save_vit32

    from vitfast.tinyvit.store import read_meta

    data, ckpt = random_image_folder(tmp_path / "data", classes=3, per_class=4), save_vit32(tmp_path / "t.safetensors", 3)
    flat = tmp_path / "flat"
    flat.mkdir()
    for c in sorted(os.listdir(data)):
        for f in sorted(os.listdir(os.path.join(data, c))):
            shutil.copy(os.path.join(data, c, f), flat / f"{c}_{f}")

    def vitfast(*args):
        return subprocess.run([sys.executable, "-m", "vitfast", "tinyvit", *args], capture_output=True, text=True,
                              timeout=600)

    store = str(tmp_path / "store")
    teacher = ["--teacher", "vit_tiny_patch16_224", "--checkpoint", ckpt, "--num-classes", "3", "--model-kwargs", *VIT32]
    p = vitfast("save-logits", *teacher, "--data", str(flat), "--epochs", "1", "--batch-size", "4", "--out", store,
                "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--data read as 12 unlabeled images" in p.stdout
    meta = read_meta(store)
    assert meta.data["kind"] == "unlabeled images" and meta.augmentation["recipe"]["unlabeled"] and meta.num_classes == 3
    p = vitfast("verify", store, *teacher, "--data", str(flat), "--samples", "4")
    assert p.returncode == 0 and "store verified" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    student = ["--student", "vit_tiny_patch16_224", "--model-kwargs", *VIT32, "--epochs", "1", "--batch-size", "4",
               "--no-progress"]
    p = vitfast("distill", "--store", store, "--data", str(flat), "--eval-data", data, *student,
                "--out", str(tmp_path / "s"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "held-out accuracy" in p.stdout
    p = vitfast("distill", "--labels-only", "--data", str(flat), *student, "--out", str(tmp_path / "gt"))
    assert p.returncode == 2 and "has no class sub-folders" in p.stderr and p.stderr.count("\n") == 1, p.stderr[-2000:]
    # two class folders for a 3-class teacher: refused (the wrong folder?), unless --unlabeled
    two = tmp_path / "two"
    shutil.copytree(os.path.join(data, "c0"), two / "a")
    shutil.copytree(os.path.join(data, "c1"), two / "b")
    save = ["save-logits", *teacher, "--data", str(two), "--epochs", "1", "--batch-size", "4", "--no-progress"]
    p = vitfast(*save, "--out", str(tmp_path / "s2"))
    assert p.returncode == 2 and "3 classes, --data 2 class folders (or --unlabeled" in p.stderr, p.stderr[-2000:]
    p = vitfast(*save, "--unlabeled", "--out", str(tmp_path / "s2"))
    assert p.returncode == 0 and "--data read as 8 unlabeled images" in p.stdout, p.stderr[-2000:]
    # the same images as a labeled folder are other data for this store
    p = vitfast("distill", "--store", store, "--data", data, *student, "--out", str(tmp_path / "other"))
    assert p.returncode == 2 and "other data than these 12 samples: other files" in p.stderr, p.stderr[-2000:]


def test_a_replay_started_at_batch_k_gives_the_epochs_batches_from_k(tmp_path):
    """StoreReplay(epoch, start=k), what a distillation resumed within an epoch reads: the
    uninterrupted epoch's batches from the k-th on (images, seeds and the store's records)."""
    from vitfast.models.digits_vit import load_digits_teacher
    from vitfast.tinyvit.train import StoreReplay

    ds, _ = small_setup(40)
    store = str(tmp_path / "store")
    save_logits(load_digits_teacher(), ds, digits_transform(), store, range(1), k=5, mixup_args=MIXUP,
                progress=False, log=lambda *_: None)
    replay = StoreReplay(store, ds, digits_transform(), 8, workers=0)
    full = list(replay(1))  # student epoch 1 replays store epoch 0
    assert len(full) == replay.steps_per_epoch == 5
    for k in (2, 5):
        got = list(replay(1, start=k))
        assert len(got) == len(full) - k
        for a, b in zip(full[k:], got):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
