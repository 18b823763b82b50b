"""A logit store knows which data it was written for (vitfast.data.identity): readers refuse other
data of the same size, which would otherwise train on soft labels of other images."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from vitfast.data.folders import image_folder
from vitfast.data.identity import data_identity, identity_mismatch
from vitfast.tinyvit.store import StoreError, StoreMeta, check_store_data, read_meta, write_meta


def _folder(tmp_path, name="A", **kw):
    from small_models import random_image_folder

    return random_image_folder(tmp_path / name, **kw)


def test_image_folder_identity_follows_files_not_location(tmp_path):
    a = image_folder(_folder(tmp_path))
    moved = shutil.copytree(tmp_path / "A", tmp_path / "elsewhere" / "A")
    ident = data_identity(a)
    assert ident["kind"] == "image folder" and ident["class_counts"] == {"c0": 8, "c1": 8}
    assert data_identity(image_folder(str(moved))) == ident            # another mount, same data
    assert identity_mismatch(ident, data_identity(image_folder(str(moved)))) is None

    swapped = shutil.copytree(tmp_path / "A", tmp_path / "B")           # same size, same class counts
    (swapped / "c0" / "0.png").rename(swapped / "c1" / "x.png")
    (swapped / "c1" / "0.png").rename(swapped / "c0" / "x.png")
    why = identity_mismatch(ident, data_identity(image_folder(str(swapped))))
    assert why is not None and "same number of images per class" in why

    (swapped / "c1" / "1.png").rename(swapped / "c0" / "y.png")       # a class gained what another lost
    why = identity_mismatch(ident, data_identity(image_folder(str(swapped))))
    assert "'c0': 8 stored, 9 here" in why and "'c1': 8 stored, 7 here" in why


def test_tensor_subset_and_unknown_data():
    x, y = torch.randn(10, 3, 4, 4), torch.randint(0, 3, (10,))
    ident = data_identity(torch.utils.data.TensorDataset(x, y))
    assert ident["kind"] == "tensors" and sum(ident["class_counts"].values()) == 10
    assert data_identity(torch.utils.data.TensorDataset(x.clone(), y.clone())) == ident
    x2 = x.clone()
    x2[3, 0, 0, 0] += 1
    assert identity_mismatch(ident, data_identity(torch.utils.data.TensorDataset(x2, y))) is not None
    sub = data_identity(torch.utils.data.Subset(torch.utils.data.TensorDataset(x, y), [0, 2, 4]))
    assert sub["kind"] == "subset of tensors"
    assert sub != data_identity(torch.utils.data.Subset(torch.utils.data.TensorDataset(x, y), [0, 4, 2]))
    assert data_identity(list(range(5))) is None                        # cannot say: taken on trust
    assert identity_mismatch(None, ident) is None and identity_mismatch(ident, None) is None


def test_store_meta_records_data_and_old_stores_stay_readable(tmp_path):
    a = image_folder(_folder(tmp_path))
    meta = StoreMeta(k=2, num_classes=2, dataset_size=len(a), data=data_identity(a))
    write_meta(str(tmp_path / "s"), meta)
    assert read_meta(str(tmp_path / "s")) == meta
    check_store_data(str(tmp_path / "s"), meta, a)
    b = image_folder(_folder(tmp_path, "B", seed=1))
    b.samples = b.samples[::-1]                                         # same files, another order
    with pytest.raises(StoreError, match="other data than these 16 samples.*save-logits"):
        check_store_data(str(tmp_path / "s"), meta, b)
    with pytest.raises(StoreError, match=r"another data set \(the same number of images per class, but other files"):
        write_meta(str(tmp_path / "s"), StoreMeta(k=2, num_classes=2, dataset_size=len(b), data=data_identity(b)))
    # A store written before the identity was kept: its store.json has no "data"; it stays
    # readable, a resumed save-logits may extend it, and readers take their data on trust.
    old = tmp_path / "old"
    old.mkdir()
    d = json.loads((tmp_path / "s" / "store.json").read_text())
    del d["data"]
    (old / "store.json").write_text(json.dumps(d))
    old_meta = read_meta(str(old))
    assert old_meta.data is None
    write_meta(str(old), meta)
    check_store_data(str(old), old_meta, b)


def test_distill_and_verify_refuse_a_store_of_other_data(tmp_path):
    """save-logits on folder A; B holds the same images with one file of each class swapped.
    distill refuses B in one line (before it trains), verify fails its data check, A still trains."""
    from small_models import VIT32, save_vit32

    data = _folder(tmp_path, per_class=6)
    other = shutil.copytree(tmp_path / "A", tmp_path / "B")
    (other / "c0" / "0.png").rename(other / "c1" / "x.png")
    (other / "c1" / "0.png").rename(other / "c0" / "x.png")
    ckpt, store = save_vit32(tmp_path / "t.safetensors"), str(tmp_path / "store")

    def vitfast(*args):
        return subprocess.run([sys.executable, "-m", "vitfast", "tinyvit", *args], capture_output=True, text=True,
                              timeout=600)

    model = ["--teacher", "vit_tiny_patch16_224", "--checkpoint", ckpt, "--num-classes", "2", "--model-kwargs", *VIT32]
    p = vitfast("save-logits", *model, "--data", data, "--epochs", "1", "--batch-size", "4", "--out", store,
                "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    p = vitfast("inspect", store)
    assert "data: image folder" in p.stdout and "2 classes of 6-6 images" in p.stdout, p.stdout
    student = ["distill", "--store", store, "--student", "vit_tiny_patch16_224", "--model-kwargs", "img_size=32",
               "depth=1", "--epochs", "1", "--batch-size", "4", "--no-progress"]
    p = vitfast(*student, "--data", str(other), "--out", str(tmp_path / "s_other"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert "other data" in p.stderr and "renamed, moved or replaced" in p.stderr
    p = vitfast("verify", store, *model, "--data", str(other), "--samples", "4")
    assert p.returncode == 1 and "data check FAILED" in p.stdout, p.stdout[-2000:]
    p = vitfast(*student, "--data", data, "--out", str(tmp_path / "s_same"))
    assert p.returncode == 0, p.stderr[-3000:]
