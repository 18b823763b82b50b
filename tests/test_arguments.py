"""Arguments that make no sense are refused before any expensive work, in one line naming the
option, with exit status 2 -- and a failed start leaves nothing that blocks the corrected run."""
import os
import subprocess
import sys

import pytest


def vitfast(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vitfast", *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(p, words):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr[-2000:]


@pytest.mark.parametrize("args,words", [
    (["--rank-step", "0"], "--rank-step"),
    (["--rank-step", "-32"], "--rank-step"),
    (["--target-params", "1.5"], "--target-params must be a fraction"),
    (["--target-params", "0"], "--target-params"),
    (["--target-params", "0.01"], "the fewest this model can reach"),
    (["--batch-size", "0"], "--batch-size"),
    (["--proxy-size", "0"], "--proxy-size"),
    (["--proxy-size", "-1"], "--proxy-size"),
    (["--gfm-epochs", "0"], "--gfm-epochs"),
    (["--model", "vit_tiny_patch16_224", "--data", "."], "no weights given"),
    (["--model", "vit_tiny_patch16_22", "--data", "."], "did you mean"),
    (["--model-kwargs", "img_size=32"], "give --model too"),
    (["--input-size", "32"], "give --model too"),
    (["--model", "vit_tiny_patch16_224"], "--model and --data go together"),
    (["--data", "."], "--model and --data go together"),
    (["--model", "vit_tiny_patch16_224", "--checkpoint", "no.safetensors", "--data", "."],
     "checkpoint 'no.safetensors' does not exist"),
    (["--model", "vit_tiny_patch16_224", "--checkpoint", ".", "--data", "."], "checkpoint '.' is a folder"),
])
def test_lowrank_refuses(tmp_path, args, words):
    one_line_error(vitfast("lowrank", "--out", str(tmp_path / "o"), *args), words)
    assert not os.path.exists(tmp_path / "o")  # nothing left behind


def test_lowrank_refuses_another_configuration_in_the_same_folder(tmp_path):
    """run.json is written before any work: kill the first run once it exists (a crash), then
    another --target-params into the same folder is refused at once."""
    import time

    out = tmp_path / "o"
    first = subprocess.Popen([sys.executable, "-m", "vitfast", "lowrank", "--out", str(out), "--target-params", "0.9"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "run.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    first.kill()
    first.wait()
    assert (out / "run.json").exists()
    one_line_error(vitfast("lowrank", "--out", str(out), "--target-params", "0.8"), "target_params")


def test_help_states_each_default_once():
    """--help appends an option's default only where its own text does not name one, and never
    None; every other default is still shown (every command's parser)."""
    import argparse

    from vitfast.cli import build_parser
    from vitfast.engine.cli_args import HelpFormatter

    def parsers(p):
        yield p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    yield from parsers(sub)

    checked = 0
    for p in parsers(build_parser()):
        if p.formatter_class is not HelpFormatter:
            continue
        fmt = p._get_formatter()
        for a in p._actions:
            text = fmt._get_help_string(a) or ""
            assert "(default: None)" not in text, (p.prog, a.dest, text)
            if a.help and "default" in a.help.lower():  # names its default: nothing appended
                assert text == a.help, (p.prog, a.dest, text)
            elif a.help and a.default not in (None, argparse.SUPPRESS) \
                    and not isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                assert "(default: %(default)s)" in text, (p.prog, a.dest, text)
            checked += 1
    assert checked > 100  # lowrank, minivit, tinyvit save-logits and distill


def test_run_record_of_a_run_that_saved_nothing_is_dropped_after_a_refusal(tmp_path):
    """engine.run: after an argument error, the runs this process started forget their run.json
    unless they saved something beside it (then the record keeps guarding the saved state)."""
    from vitfast.engine.run import RunDir, abandon_unsaved_runs

    bare, saved, other, mine = (RunDir(str(tmp_path / n), {"lr": 1.0}, {"data": "x"})
                                for n in ("bare", "saved", "other", "mine"))
    (tmp_path / "mine").mkdir()  # a folder the user made for the run
    assert not bare.start() and not saved.start() and not mine.start()
    (tmp_path / "bare" / "log.txt").write_text("started\n")
    (tmp_path / "saved" / "checkpoint.safetensors").write_bytes(b"state")
    abandon_unsaved_runs()
    assert not os.path.exists(bare.path) and os.path.exists(saved.path)
    # the folder the run made goes too (no empty --output left behind); the user's stays, emptied
    assert not os.path.exists(tmp_path / "bare") and os.listdir(tmp_path / "mine") == []
    # a run resumed (not started) by this process is never dropped
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text('{"config": {"lr": 1.0}, "identity": {"data": "x"}}')
    assert other.start()
    abandon_unsaved_runs()
    assert os.path.exists(other.path)
    # the Python API's entry points (minivit.train_mini) behave like the command line
    from vitfast.engine.run import forgets_unsaved_runs_on_refusal
    from vitfast.errors import UserError

    @forgets_unsaved_runs_on_refusal
    def pipeline(root):
        RunDir(root, {"lr": 2.0}, {"data": "x"}).start()
        raise UserError("argument --layer-pairs: no such layer")

    with pytest.raises(UserError):
        pipeline(str(tmp_path / "api"))
    assert not os.path.exists(tmp_path / "api")


@pytest.mark.parametrize("args,words", [
    (["--topk", "0"], "--topk"),
    (["--topk", "11"], "--topk"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "3:1"], "--epochs"),
    (["--epochs", "x"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--input-size", "3", "32"], "--input-size must be N or C,H,W"),
    (["--input-size", "32"], "it applies with --data"),
    (["--model-kwargs", "img_size=32"], "give --teacher too"),
    (["--reprob", "0.5"], "--reprob: the embedded digits have their own augmentation"),
    (["--data", ".", "--reprob", "1.5"], "--reprob must lie in [0, 1]"),
    (["--data", ".", "--mixup", "-0.2"], "--mixup must be >= 0"),
    (["--data", ".", "--cutmix", "nan"], "--cutmix must be >= 0"),
    (["--data", ".", "--aa", "randaug"], "--aa: 'randaug' is not a timm auto-augment policy"),
])
def test_save_logits_refuses_and_leaves_nothing(tmp_path, args, words):
    store = tmp_path / "store"
    one_line_error(vitfast("tinyvit", "save-logits", "--out", str(store), *args), words)
    assert not (store / "store.json").exists()  # the corrected run is not blocked


@pytest.mark.parametrize("args,words", [
    (["--model-kwargs", "img_size=32"], "give --teacher too"),
    (["--input-size", "32"], "it applies with --data"),
    (["--reprob", "2"], "--reprob must lie in [0, 1]"),
    (["--smoothing", "1"], "--smoothing must lie in [0, 1)"),
    (["--mixup", "-1"], "--mixup must be >= 0"),
    (["--aa", "foo"], "--aa: 'foo' is not a timm auto-augment policy (Unknown AA policy foo)"),
    (["--unlabeled"], "--unlabeled describes --data: give --data too"),
])
def test_minivit_refuses_before_any_work(tmp_path, args, words):
    """The embedded default has its own model: options that describe another one are refused, not
    silently ignored; augmentation options out of range (or an --aa timm cannot build) are refused
    before any work; nothing is left in --output."""
    out = tmp_path / "m"
    one_line_error(vitfast("minivit", "--output", str(out), "--no-ablation", *args), words)
    assert not (out / "run.json").exists()


def test_minivit_ablation_refuses_a_starting_mini_model(tmp_path):
    """--init-from would start every variant of the embedded ablation from one saved model."""
    one_line_error(vitfast("minivit", "--output", str(tmp_path / "m"), "--init-from", str(tmp_path)),
                   "drop --ablation or --teacher/--data/--store/--init-from")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command,kwargs,words", [
    ("lowrank", ["embed_dim=95", "num_heads=3"], "AssertionError: dim should be divisible by num_heads"),
    ("lowrank", ["mlp_layer=SwiGLUPacked"], "TypeError: 'str' object is not callable"),
    ("lowrank", ["no_such_option=1"], "TypeError"),
    ("minivit", ["embed_dim=95", "num_heads=3"], "AssertionError: dim should be divisible by num_heads"),
    ("save-logits", ["no_such_option=1"], "TypeError"),
])
def test_model_kwargs_the_constructor_refuses_are_one_line(tmp_path, command, kwargs, words):
    """A registered name with arguments timm's constructor refuses: one line naming the model, the
    arguments and timm's reason (a raw traceback before), and nothing left that blocks the corrected
    run."""
    out = tmp_path / "o"
    model = "--model" if command == "lowrank" else "--teacher"
    (tmp_path / "data").mkdir()
    args = [model, "vit_tiny_patch16_224", "--model-kwargs", *kwargs, "--data", str(tmp_path / "data")]
    cmd = ["tinyvit", "save-logits"] if command == "save-logits" else [command]
    p = vitfast(*cmd, *args, "--checkpoint", os.devnull, "--out", str(out))
    one_line_error(p, "vit_tiny_patch16_224: timm could not build it with")
    assert words in p.stderr and "check --model-kwargs" in p.stderr
    assert not (out / "run.json").exists() and not (out / "store.json").exists()


def test_distill_refuses_bad_epochs_and_missing_data(tmp_path):
    one_line_error(vitfast("tinyvit", "distill", "--labels-only", "--epochs", "0", "--out", str(tmp_path / "d")),
                   "--epochs")
    one_line_error(vitfast("tinyvit", "distill", "--labels-only", "--student", "vitfast_digits_vit", "--data",
                           str(tmp_path / "none"), "--out", str(tmp_path / "d2")), "does not exist")


def test_store_of_other_classes_is_refused_up_front(tmp_path):
    import torch

    from vitfast.models.digits_vit import load_digits_teacher, vitfast_digits_vit
    from vitfast.tinyvit.defaults import MIXUP, digits_train_set, digits_transform
    from vitfast.tinyvit.store import StoreError
    from vitfast.tinyvit.train import distill, save_logits

    ds, _ = digits_train_set()
    ds = torch.utils.data.Subset(ds, range(40))
    store = str(tmp_path / "store")
    save_logits(load_digits_teacher(), ds, digits_transform(), store, range(1), k=5, mixup_args=MIXUP, progress=False,
                log=lambda *_: None)
    with pytest.raises(StoreError, match="10-class soft labels, the student has 7 classes"):
        distill(vitfast_digits_vit(num_classes=7), ds, digits_transform(), store, 1, progress=False, log=lambda *_: None)


def test_lowrank_reads_a_config_file(tmp_path):
    """timm's --config FILE.yaml: its values are the defaults, checked like options."""
    cfg = tmp_path / "lowrank.yaml"
    cfg.write_text("target-params: 1.5\nrank_step: 16\n")
    proc = subprocess.run([sys.executable, "-m", "vitfast", "lowrank", "--config", str(cfg), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2 and "argument --target-params" in proc.stderr and "1.5" in proc.stderr, proc.stderr
    cfg.write_text("gfm_epochz: 3\n")
    proc = subprocess.run([sys.executable, "-m", "vitfast", "lowrank", "--config", str(cfg)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown option(s) gfm_epochz" in proc.stderr, proc.stderr


def test_tinyvit_commands_read_a_config_file(tmp_path):
    """--config works for nested commands too (tinyvit save-logits / distill)."""
    cfg = tmp_path / "save.yaml"
    cfg.write_text("topk: 0\n")
    proc = subprocess.run([sys.executable, "-m", "vitfast", "tinyvit", "save-logits", "--config", str(cfg), "--out",
                           str(tmp_path / "store")], capture_output=True, text=True)
    assert proc.returncode == 2 and "argument --topk" in proc.stderr, proc.stderr
    cfg.write_text("epochs: 0\nlabels_only: true\n")
    proc = subprocess.run([sys.executable, "-m", "vitfast", "tinyvit", "distill", "--config", str(cfg), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2 and "argument --epochs must be >= 1" in proc.stderr, proc.stderr


def test_num_classes_may_be_given_among_the_model_arguments():
    """--model-kwargs num_classes=N builds the model (a TypeError traceback before: two values for
    one keyword); with a --num-classes that says otherwise it is refused in words."""
    from vitfast.engine.models import create_model
    from vitfast.errors import UserError

    small = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3}
    assert create_model("vit_tiny_patch16_224", model_kwargs={**small, "num_classes": 4}).num_classes == 4
    assert create_model("vit_tiny_patch16_224", num_classes=4, model_kwargs={**small, "num_classes": 4}).num_classes == 4
    with pytest.raises(UserError, match="--num-classes 3 and num_classes=4 in the model's arguments disagree"):
        create_model("vit_tiny_patch16_224", num_classes=3, model_kwargs={**small, "num_classes": 4})


def test_a_safetensors_file_under_another_name_is_read(tmp_path):
    """Weights saved by safetensors but named .bin / .pt (or nothing) are recognised by their
    header, not sent to torch.load (which failed with an unpickling error about weights_only)."""
    import torch
    from safetensors.torch import save_file

    from vitfast.engine.models import read_state_dict

    state = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    for name in ("weights.bin", "weights"):
        save_file(state, str(tmp_path / name))
        got = read_state_dict(str(tmp_path / name))
        assert got.keys() == state.keys() and all(torch.equal(got[k], v) for k, v in state.items())
    torch.save(state, tmp_path / "pickled.pt")  # a torch file still goes to torch.load
    assert torch.equal(read_state_dict(str(tmp_path / "pickled.pt"))["w"], state["w"])
    (tmp_path / "tiny").write_bytes(b"x")
    from vitfast.errors import UserError

    with pytest.raises(UserError, match="cannot be read"):
        read_state_dict(str(tmp_path / "tiny"))


def test_run_identity_of_a_folder_ignores_hidden_files_and_accepts_older_records(tmp_path):
    """engine.run.folder_digest skips hidden files (a .DS_Store a file browser writes mid-run no
    longer blocks the resume) and follows linked folders, as the data readers do; a run record of
    an older vitfast (the digest of every file) is still accepted for the same folder."""
    import json

    from vitfast.engine.run import ResumeMismatch, RunDir, folder_digest

    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (data / "cat" / "0.png").write_bytes(b"png")
    (data / ".cache").mkdir()
    (data / ".cache" / "x").write_bytes(b"1")
    run = lambda: RunDir(str(tmp_path / "run"), {"lr": 1.0}, {}, folders={"data": str(data)})  # noqa: E731
    assert not run().start()
    (data / ".DS_Store").write_bytes(b"finder")
    assert run().start()  # hidden files are no data
    # a record written by an older vitfast held the digest of every file
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    record["identity"]["data"] = folder_digest(str(data), legacy=True)
    assert record["identity"]["data"] != folder_digest(str(data))
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    assert run().start()
    (data / "cat" / "1.png").write_bytes(b"png")  # other data is still other data
    with pytest.raises(ResumeMismatch, match="identity data="):
        run().start()
    # a linked class folder is part of the data, as ImageFolder reads it
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "0.png").write_bytes(b"png")
    before = folder_digest(str(data))
    os.symlink(tmp_path / "dog", data / "dog")
    assert folder_digest(str(data)) != before


def test_a_new_head_replaces_every_classifier_of_the_checkpoint(tmp_path):
    """create_model(new_head=True) on a DeiT with a distillation head: both heads (weights and
    biases) of the file's 7 classes are replaced by the model's new 4-class ones; every other
    tensor comes from the file; without a class difference nothing is replaced."""
    import timm
    import torch
    from safetensors.torch import save_file

    from vitfast.engine.models import create_model

    kw = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3)
    torch.manual_seed(0)
    src = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=7, **kw)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "d.safetensors"))
    m = create_model("deit_tiny_distilled_patch16_224", num_classes=4, checkpoint=str(tmp_path / "d.safetensors"),
                     new_head=True, model_kwargs=kw)
    assert m.vitfast_new_head == 7
    own, file = m.state_dict(), src.state_dict()
    heads = {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert all(own[k].shape[0] == 4 for k in heads)
    assert all(torch.equal(own[k], v) for k, v in file.items() if k not in heads)
    same = create_model("deit_tiny_distilled_patch16_224", num_classes=7, checkpoint=str(tmp_path / "d.safetensors"),
                        new_head=True, model_kwargs=kw)
    assert same.vitfast_new_head is None and all(torch.equal(same.state_dict()[k], v) for k, v in file.items())


def test_an_output_inside_the_data_is_refused(tmp_path):
    """An --output that is, or lies inside, --data or --eval-data: the run's files (the report's
    plot, a run folder taken for a class) would be read as data. Refused before anything is
    written; data inside the output folder is fine."""
    from small_models import random_image_folder

    from vitfast.engine.run import RunDir
    from vitfast.errors import UserError
    from vitfast.models.digits_vit import ASSET

    data = random_image_folder(tmp_path / "train", classes=2, per_class=2)
    listing = sorted(os.walk(data))
    teacher = ["vitfast_digits_vit", "--checkpoint", ASSET, "--data", data, "--device", "cpu"]
    for args in (["lowrank", "--model", *teacher, "--output", os.path.join(data, "out")],
                 ["tinyvit", "save-logits", "--teacher", *teacher, "--output", os.path.join(data, "c0", "store")],
                 ["tinyvit", "distill", "--labels-only", "--model", *teacher, "--output", data],
                 ["minivit", "--teacher", *teacher, "--unlabeled", "--output", os.path.join(data, "c1", "mini")]):
        one_line_error(vitfast(*args), f"lies inside --data '{data}': the run's files would be read as data")
    os.symlink(data, tmp_path / "link")
    with pytest.raises(UserError, match="lies inside --eval-data"):
        RunDir(str(tmp_path / "link" / "run"), {}, {}, folders={"data": None, "eval_data": data}).start()
    assert sorted(os.walk(data)) == listing  # nothing written into the data
    assert RunDir(str(tmp_path), {}, {}, folders={"data": data}).start() is False  # the data inside the output
