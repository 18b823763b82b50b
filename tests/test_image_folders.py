"""Data folders as users lay them out: an empty class folder, a data set's root with train/ val/,
images lying in a plain folder (fine for unlabeled proxy images), each a one-line error naming
what is wrong, or read as meant."""
import os

import numpy as np
import pytest
from PIL import Image

from vitfast.data.folders import check_image_folder, image_folder, unlabeled_images
from vitfast.errors import UserError


def _images(folder, n, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))


def test_a_class_folder_without_images_is_named(tmp_path):
    _images(tmp_path / "cat", 2)
    _images(tmp_path / "dog", 2)
    (tmp_path / "emu").mkdir()
    (tmp_path / "owl").mkdir()
    (tmp_path / "owl" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"class folder\(s\) 'emu', 'owl' hold no image files.*remove them"):
        check_image_folder(str(tmp_path), "--data")
    # unlabeled images do not care (the folders are not classes there)
    assert len(unlabeled_images(str(tmp_path))) == 4


def test_a_data_sets_root_is_refused_with_the_split_to_give(tmp_path):
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            _images(tmp_path / split / c, 2)
    with pytest.raises(UserError, match=r"splits 'train', 'val' of a data set.*e\.g\. '.*train'"):
        check_image_folder(str(tmp_path), "--data")
    with pytest.raises(UserError, match="splits 'train', 'val'"):  # unlabeled readers would mix in val/ too
        unlabeled_images(str(tmp_path), what="--data")
    assert check_image_folder(str(tmp_path / "train")) == ["cat", "dog"]


def test_classes_named_like_splits_with_their_own_images_are_classes(tmp_path):
    # a real class called "train" (vehicles) holds images, not class folders
    _images(tmp_path / "train", 2)
    _images(tmp_path / "test", 2)
    assert check_image_folder(str(tmp_path)) == ["test", "train"]


def test_images_without_class_folders(tmp_path):
    _images(tmp_path, 3)
    with pytest.raises(UserError, match="3 images lie directly in it"):
        image_folder(str(tmp_path), what="--data")
    ds = unlabeled_images(str(tmp_path))
    assert len(ds) == 3 and [os.path.basename(p) for p, _ in ds.samples] == ["0.png", "1.png", "2.png"]
    img, label = ds[1]
    assert img.size == (8, 8) and label == 0


def test_unlabeled_images_take_every_image_under_the_folder(tmp_path):
    # loose images beside sub-folders: ImageFolder would drop the loose ones silently
    _images(tmp_path, 2)
    _images(tmp_path / "more" / "deeper", 2, seed=1)
    ds = unlabeled_images(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p, _ in ds.samples] == [
        "0.png", "1.png", os.path.join("more", "deeper", "0.png"), os.path.join("more", "deeper", "1.png")]


def test_unlabeled_images_of_a_class_tree_keep_image_folder_order(tmp_path):
    _images(tmp_path / "b", 2)
    _images(tmp_path / "a", 3)
    assert [p for p, _ in unlabeled_images(str(tmp_path)).samples] == [p for p, _ in image_folder(str(tmp_path)).samples]


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "is not a folder"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), r"holds no image files \(found e\.g\. a\.txt\)"),
])
def test_unlabeled_images_refuse(tmp_path, make, words):
    make(tmp_path / "d")
    with pytest.raises(UserError, match=words):
        unlabeled_images(str(tmp_path / "d"), what="--data")


def test_an_unreadable_image_is_named(tmp_path):
    _images(tmp_path / "c", 1)
    (tmp_path / "c" / "broken.jpg").write_text("not an image")
    ds = image_folder(str(tmp_path))
    with pytest.raises(UserError, match=r"image '.*broken\.jpg' cannot be read"):
        [ds[i] for i in range(len(ds))]


def test_evaluating_on_the_training_folder_is_noted(tmp_path):
    from vitfast.data.folders import overlap_note

    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    train, val = str(tmp_path / "train"), str(tmp_path / "val")
    assert overlap_note(train, val) is None and overlap_note(train, None) is None
    assert "is --data" in overlap_note(train, train + os.sep)
    assert "lies inside --data" in overlap_note(str(tmp_path), val)
    assert "holds --data" in overlap_note(train, str(tmp_path))
    os.symlink(train, tmp_path / "link")
    assert "is --data" in overlap_note(train, str(tmp_path / "link"))
    assert overlap_note(train, str(tmp_path / "train2")) is None  # a common prefix is not a parent


def test_hidden_files_and_folders_are_not_data(tmp_path):
    """A Jupyter checkpoint folder is no class, and macOS's AppleDouble "._x.png" files (not
    images, though named like them) are no samples: torchvision counted both, and the loader
    stopped the run where it reached one."""
    _images(tmp_path / "cat", 2)
    _images(tmp_path / "dog", 2)
    _images(tmp_path / ".ipynb_checkpoints", 1)
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _images(tmp_path / "dog" / ".thumbs", 1)
    assert check_image_folder(str(tmp_path)) == ["cat", "dog"]
    for ds in (image_folder(str(tmp_path)), unlabeled_images(str(tmp_path))):
        assert ds.classes == ["cat", "dog"]
        assert sorted(os.path.relpath(p, tmp_path) for p, _ in ds.samples) == [
            os.path.join(c, f"{i}.png") for c in ("cat", "dog") for i in range(2)]
        assert all(ds[i][0].size == (8, 8) for i in range(len(ds)))
    flat = tmp_path / "flat"
    _images(flat, 1)
    (flat / "._0.png").write_bytes(b"junk")
    assert [os.path.basename(p) for p, _ in unlabeled_images(str(flat)).samples] == ["0.png"]
