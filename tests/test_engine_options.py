"""The training engine's speed/precision switches: --compile (torch.compile of the training steps)
trains the same model as eager, --amp-dtype accepts the dtype names (and the old booleans) and
refuses anything else by name, for every pipeline's config."""
import pytest
import torch
from torch import nn

from vitfast.engine import TrainConfig, fit
from vitfast.engine.trainer import amp_name, autocast_for
from vitfast.errors import UserError


def _train(compile_steps, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)

    def batches(epoch):
        perm = torch.randperm(32, generator=torch.Generator().manual_seed(epoch))
        return [(x[perm[i:i + 8]], y[perm[i:i + 8]]) for i in range(0, 32, 8)]

    def loss_fn(m, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(m(xb), yb), len(yb), {}

    cfg = TrainConfig(epochs=2, lr=1e-2, warmup_epochs=0, compile=compile_steps, seed=3)
    res = fit(model, cfg, batches=batches, steps_per_epoch=4, loss_fn=loss_fn, device="cpu",
              out_dir=str(tmp_path / ("c" if compile_steps else "e")), progress=False, log=lambda *_: None)
    return [h["train_loss"] for h in res.history], model


def test_compiled_steps_train_the_same_model(tmp_path):
    eager_losses, eager = _train(False, tmp_path)
    comp_losses, comp = _train(True, tmp_path)
    assert eager_losses == pytest.approx(comp_losses, rel=1e-4)
    for a, b in zip(eager.parameters(), comp.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the checkpoint holds the plain module's keys (no "_orig_mod." prefix from torch.compile)
    import glob

    from safetensors import safe_open

    files = glob.glob(str(tmp_path / "c" / "*.safetensors"))
    assert files
    with safe_open(files[0], "pt") as f:
        assert not any("_orig_mod" in k for k in f.keys())


def test_amp_names():
    assert amp_name(True) == "bfloat16" and amp_name(False) == "float32" and amp_name(None) == "float32"
    assert amp_name("float16") == "float16"
    with pytest.raises(UserError, match="--amp-dtype"):
        amp_name("int8")
    # off the GPU autocast is off whatever the name: CPU steps run float32
    with autocast_for(torch.device("cpu"), "bfloat16"):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_every_pipeline_config_refuses_an_unknown_amp_dtype():
    from vitfast.lowrank.pipeline import LowRankConfig

    with pytest.raises(UserError, match="--amp-dtype"):
        LowRankConfig(amp_dtype="int8").validate()
    LowRankConfig(amp_dtype="float16", compile=True).validate()
    with pytest.raises(UserError, match="--amp-dtype"):
        TrainConfig(amp_dtype="fp8").validate()


def test_command_lines_take_compile_and_amp_dtype():
    """Each training command parses --compile and --amp-dtype (timm's names)."""
    import argparse

    from vitfast.cli import build_parser

    parser = build_parser()
    for argv in (["lowrank", "--compile", "--amp-dtype", "float16"],
                 ["tinyvit", "distill", "--out", "x", "--compile", "--amp-dtype", "float32"],
                 ["minivit", "--compile", "--amp-dtype", "float16"]):
        args = parser.parse_args(argv)
        assert args.compile is True and args.amp_dtype in ("float16", "float32"), argv
    with pytest.raises(SystemExit):
        parser.parse_args(["lowrank", "--amp-dtype", "int8"])
    assert isinstance(parser, argparse.ArgumentParser)


def test_every_command_has_one_workers_default():
    """--workers not given means the same thing in every pipeline (min(4, CPUs - 1), at least 1), 0
    loads in the main process, and a negative count is refused by name."""
    import os

    from vitfast.cli import build_parser
    from vitfast.engine.cli_args import default_workers, resolve_workers
    from vitfast.minivit.cli import config_from_args
    from vitfast.tinyvit.cli import _workers

    assert default_workers() == max(1, min(4, (os.cpu_count() or 1) - 1))
    assert resolve_workers(None) == default_workers() and resolve_workers(0) == 0 and resolve_workers(3) == 3
    with pytest.raises(UserError, match="--workers"):
        resolve_workers(-1)
    parser = build_parser()
    user = ["minivit", "--teacher", "deit_tiny_patch16_224", "--data", "some/folder"]
    assert config_from_args(parser.parse_args(user)).workers == default_workers()
    assert config_from_args(parser.parse_args(user + ["--workers", "0"])).workers == 0
    with pytest.raises(UserError, match="--workers"):
        config_from_args(parser.parse_args(user + ["--workers", "-2"]))
    # the embedded default keeps its own recipe (the digits sit in memory: no workers) unless given
    assert config_from_args(parser.parse_args(["minivit"])).workers == 0
    assert config_from_args(parser.parse_args(["minivit", "--workers", "2"])).workers == 2
    for argv in (["tinyvit", "distill", "--out", "x"], ["tinyvit", "save-logits", "--out", "x"]):
        assert _workers(parser.parse_args(argv)) == default_workers()
        assert _workers(parser.parse_args(argv + ["--workers", "0"])) == 0


def test_a_run_started_before_an_option_existed_still_resumes(tmp_path):
    """run.json of a run started before vitfast grew an option: the option at its off value (None,
    False, 0, empty) matches the missing key, so an upgrade mid-run does not strand the run; set to
    anything else it is another configuration."""
    import pytest

    from vitfast.engine import ResumeMismatch, RunDir

    RunDir(str(tmp_path), {"epochs": 3, "nested": {"lr": 0.1}}, {"data": "abc"}).start()
    for later in ({"distill_teacher": None}, {"distill_pretrained": False}, {"distill_model_kwargs": {}},
                  {"nested": {"lr": 0.1, "new_weight": 0.0}}):
        assert RunDir(str(tmp_path), {"epochs": 3, "nested": {"lr": 0.1}, **later}, {"data": "abc"}).start() is True
    for later, key in (({"distill_teacher": "swin_base_patch4_window7_224"}, "distill_teacher"),
                       ({"nested": {"lr": 0.1, "new_weight": 0.5}}, "nested.new_weight"),
                       ({"epochs": 4}, "epochs")):
        with pytest.raises(ResumeMismatch, match=f"config {key}="):
            RunDir(str(tmp_path), {"epochs": 3, "nested": {"lr": 0.1}, **later}, {"data": "abc"}).start()
