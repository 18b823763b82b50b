"""--eval-data labels mean what the model's outputs mean: matched by folder name to the training
data's classes (a subset is scored correctly), or, without training classes, one folder per output;
anything else is refused before training, not at the first evaluation or silently."""
import shutil
import subprocess
import sys

import pytest
import timm
import torch

from vitfast.data.folders import image_folder
from vitfast.engine.evaluation import folder_loader, match_classes
from vitfast.errors import UserError


def _folders(tmp_path, name, classes, per_class=2):
    from small_models import random_image_folder

    root = random_image_folder(tmp_path / name, classes=len(classes), per_class=per_class)
    for i, c in enumerate(classes):
        (tmp_path / name / f"c{i}").rename(tmp_path / name / c)
    return root


def test_labels_are_matched_by_name(tmp_path):
    train = ["cat", "dog", "emu"]
    ds = image_folder(_folders(tmp_path, "val", ["dog", "emu"]))       # a subset: sorted index 0 is 'dog'
    assert ds.targets[0] == 0
    match_classes(ds, train, 3)
    assert [ds.classes[t] for t in ds.targets] == ["dog", "dog", "emu", "emu"]
    assert set(ds.targets) == {1, 2} and [t for _, t in ds.samples] == ds.targets
    same = image_folder(_folders(tmp_path, "same", train))
    before = list(same.samples)
    match_classes(same, train, 3)
    assert same.samples == before                                      # the same classes: untouched


@pytest.mark.parametrize("found,train,heads,words", [
    (["cat", "owl"], ["cat", "dog"], 2, "'owl' are not classes of the training data"),
    (["a", "b", "c"], None, 2, "3 class folder(s), the model's head has 2 outputs"),
    (["a"], None, 2, "one per output"),
    (["cat", "dog"], ["cat", "dog"], 1, "past the model's 1 outputs"),
])
def test_labels_that_cannot_mean_the_outputs_are_refused(tmp_path, found, train, heads, words):
    with pytest.raises(UserError) as info:
        match_classes(image_folder(_folders(tmp_path, "val", found)), train, heads)
    assert str(info.value).startswith("argument --eval-data") and words in str(info.value), str(info.value)


def test_folder_loader_scores_a_subset_against_the_right_outputs(tmp_path):
    """A model that always answers output 1 ('dog'): 100% on a 'dog'-only folder, matched by name
    (sorted order alone would have called it label 0 and scored 0%)."""
    from vitfast.engine.evaluation import evaluate

    root = tmp_path / "val"
    _folders(tmp_path, "all", ["cat", "dog"])
    root.mkdir()
    shutil.copytree(tmp_path / "all" / "dog", root / "dog")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3,
                              num_classes=2)
    torch.nn.init.zeros_(model.head.weight)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 5.0]))
    loader = folder_loader(str(root), model, 4, 0, train_classes=["cat", "dog"])
    assert evaluate(model, loader, "cpu")["top1"] == 1.0


def test_distill_refuses_eval_classes_before_training(tmp_path):
    """The label past the head used to fail at the first evaluation, after an epoch of training."""
    from small_models import VIT32, save_vit32

    data = _folders(tmp_path, "train", ["c0", "c1"], per_class=6)
    val = _folders(tmp_path, "val", ["c0", "c1", "c2"])
    store = str(tmp_path / "store")
    cli = [sys.executable, "-m", "vitfast", "tinyvit"]
    p = subprocess.run(cli + ["save-logits", "--teacher", "vit_tiny_patch16_224", "--checkpoint",
                              save_vit32(tmp_path / "t.safetensors"), "--num-classes", "2", "--model-kwargs", *VIT32,
                              "--data", data, "--epochs", "1", "--batch-size", "4", "--out", store, "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run(cli + ["distill", "--store", store, "--data", data, "--eval-data", val, "--student",
                              "vit_tiny_patch16_224", "--model-kwargs", "img_size=32", "depth=1", "--epochs", "1",
                              "--batch-size", "4", "--out", str(tmp_path / "s"), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "'c2' are not classes of the training data" in p.stderr, p.stderr[-2000:]
    assert "epoch 1/1" not in p.stdout
