"""The AAFM + GFM pipeline on small models: layer maths, statistics, search, fine-tuning with
resume, checkpoints, bad input, and the CLI on the embedded default."""
import json
import os

import pytest
import torch
from torch import nn

import vitfast
from vitfast.errors import UserError
from vitfast.lowrank import LowRankLinear, LowRankConfig, collect_linear_stats, linear_layers, pca, run_lowrank
from vitfast.lowrank.aafm import LayerChoice, candidate_ranks, greedy_allocation
from vitfast.lowrank.gfm import gfm_finetune
from vitfast.models.digits_vit import vitfast_digits_vit

from conftest import rel_err


def tiny_vit(**kw):
    cfg = dict(embed_dim=64, depth=2, num_heads=2)
    cfg.update(kw)
    return vitfast_digits_vit(**cfg).eval()


def low_rank_outputs(n, in_f, out_f, rank):
    """A linear layer whose outputs live in a rank-`rank` subspace (plus an offset)."""
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, rank) @ torch.randn(rank, in_f) / in_f**0.5)
    return lin, torch.randn(n, in_f)


def test_afm_exact_when_outputs_are_low_rank():
    lin, x = low_rank_outputs(500, 40, 30, 6)
    outs, _ = collect_linear_stats(nn.Sequential(lin), x, {"0": lin}, progress=False)
    vals, vecs = pca(outs["0"])
    low = LowRankLinear.from_afm(lin, vecs[:, :6], outs["0"].mean)
    assert rel_err(low(x), lin(x)) < 1e-5
    assert vals[6:].sum() < 1e-6 * vals.sum()


def test_afm_beats_svd_on_features_at_equal_rank():
    # Inputs concentrated in a subspace: AFM (data-aware) approximates the outputs, SVD does not.
    lin = nn.Linear(64, 64)
    x = torch.randn(2000, 8) @ torch.randn(8, 64)
    outs, _ = collect_linear_stats(nn.Sequential(lin), x, {"0": lin}, progress=False)
    _, vecs = pca(outs["0"])
    afm = LowRankLinear.from_afm(lin, vecs[:, :8], outs["0"].mean)
    svd = LowRankLinear.from_svd(lin, 8)
    assert rel_err(afm(x), lin(x)) < 1e-4 < rel_err(svd(x), lin(x))


def test_svd_full_rank_is_exact_and_param_count():
    lin = nn.Linear(24, 16)
    x = torch.randn(10, 24)
    assert rel_err(LowRankLinear.from_svd(lin, 16)(x), lin(x)) < 1e-5
    low = LowRankLinear(24, 16, 5)
    assert sum(p.numel() for p in low.parameters()) == LowRankLinear.params_for(24, 16, 5)
    with pytest.raises(ValueError, match="argument 'rank'"):
        LowRankLinear(24, 16, 17)


def test_collect_matches_direct_statistics_and_memory_budget():
    model = tiny_vit()
    x = torch.randn(40, 1, 16, 16)
    layers = linear_layers(model)
    assert "head" not in layers and len(layers) == 8
    outs, ins = collect_linear_stats(model, x, layers, batch_size=16, with_inputs=True, progress=False)
    captured = {}
    h = model.blocks[1].mlp.fc1.register_forward_hook(lambda m, i, o: captured.setdefault("y", o.detach()))
    model(x)
    h.remove()
    y = captured["y"].reshape(-1, captured["y"].shape[-1]).double()
    ref = (y - y.mean(0)).T @ (y - y.mean(0)) / y.shape[0]
    assert rel_err(outs["blocks.1.mlp.fc1"].covariance(), ref) < 1e-10
    # A budget that holds one layer at a time still gives the same statistics (more passes).
    small, _ = collect_linear_stats(model, x, layers, batch_size=16, memory_budget_mb=3.0, progress=False)
    assert rel_err(small["blocks.1.mlp.fc1"].covariance(), ref) < 1e-10
    with pytest.raises(ValueError, match="over the memory budget"):
        collect_linear_stats(model, x, layers, memory_budget_mb=0.01, progress=False)


def test_collect_huggingface_bert_encoder():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    bert = transformers.BertModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 50, (12, 10)), "attention_mask": torch.ones(12, 10, dtype=torch.long)}
    layers = linear_layers(bert, exclude=("pooler",))
    assert "encoder.layer.0.attention.self.query" in layers
    outs, _ = collect_linear_stats(bert, inputs, layers, batch_size=5, progress=False)
    assert all(acc.count.item() == 120 for acc in outs.values())


def test_greedy_allocation_meets_target_and_prefers_insensitive_layers():
    a = LayerChoice("a", 64, 64, 64 * 64 + 64, [16], {16: 0.5})
    b = LayerChoice("b", 64, 64, 64 * 64 + 64, [16], {16: 0.01})
    full = 2 * (64 * 64 + 64)
    one = LowRankLinear.params_for(64, 64, 16)
    ranks = greedy_allocation([a, b], 0, full - (64 * 64 + 64 - one))
    assert ranks == {"b": 16}
    with pytest.raises(ValueError, match="impossible"):
        greedy_allocation([a, b], 0, 100)


def test_candidate_ranks_are_below_break_even():
    assert candidate_ranks(nn.Linear(192, 576), 32) == [32, 64, 96, 128]
    assert candidate_ranks(nn.Linear(16, 16), 32) == []


def test_gfm_reduces_feature_error_and_resumes(tmp_path):
    teacher = tiny_vit()
    student = tiny_vit()
    x = torch.randn(48, 1, 16, 16)
    ckpt = str(tmp_path / "gfm")
    hist = gfm_finetune(student, teacher, x, epochs=4, lr=2e-3, batch_size=16, device="cpu", checkpoint_dir=ckpt,
                        progress=False, log=lambda *_: None)
    assert hist[-1] < hist[0]
    assert os.path.exists(os.path.join(ckpt, "checkpoint.safetensors"))  # weights + optimizer: one atomic file
    head = student.get_classifier().weight
    assert not head.requires_grad
    # A "crash" after 4 of 6 epochs: the next call resumes at epoch 5 from the checkpoint.
    resumed = tiny_vit()
    logs = []
    hist2 = gfm_finetune(resumed, teacher, x, epochs=6, lr=2e-3, batch_size=16, device="cpu", checkpoint_dir=ckpt,
                         progress=False, log=logs.append)
    assert any("resuming after epoch 4/6" in m for m in logs)
    assert len(hist2) == 6 and hist2[:4] == hist


def test_gfm_killed_within_an_epoch_resumes_at_its_last_saved_step(tmp_path, monkeypatch):
    """checkpoint_every=2: a GFM run that dies at step 3 of epoch 2 (an exception, as kill -9: no
    save on the way out) resumes at step 2 and ends with the weights of an uninterrupted run."""
    import vitfast.lowrank.gfm as gfm

    teacher, x = tiny_vit(), torch.randn(64, 1, 16, 16)
    kw = dict(epochs=2, lr=2e-3, batch_size=16, device="cpu", progress=False, checkpoint_every=2)
    torch.manual_seed(0)
    whole = tiny_vit()
    hist = gfm_finetune(whole, teacher, x, checkpoint_dir=str(tmp_path / "whole"), log=lambda *_: None, **kw)
    calls, original = {"n": 0}, gfm.masked_mse

    def dies_at_step_7(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # 4 steps per epoch: step 3 of epoch 2
            raise RuntimeError("killed")
        return original(*args)

    torch.manual_seed(0)
    stopped, ckpt = tiny_vit(), str(tmp_path / "stopped")
    monkeypatch.setattr(gfm, "masked_mse", dies_at_step_7)
    with pytest.raises(RuntimeError, match="killed"):
        gfm_finetune(stopped, teacher, x, checkpoint_dir=ckpt, log=lambda *_: None, **kw)
    monkeypatch.setattr(gfm, "masked_mse", original)
    torch.manual_seed(0)
    resumed, logs = tiny_vit(), []
    hist2 = gfm_finetune(resumed, teacher, x, checkpoint_dir=ckpt, log=logs.append, **kw)
    assert "GFM: resuming at step 2/4 of epoch 2/2" in logs, logs
    assert hist2 == hist
    for (k, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_lowrank_checkpoint_every_is_checked_and_not_part_of_the_run(tmp_path, monkeypatch, capsys):
    """--checkpoint-every reaches GFM; a negative count is refused by name; changing it between
    resumes is allowed (it changes the saving, not the result), unlike --gfm-epochs."""
    import vitfast.lowrank.pipeline as pipeline
    from vitfast.cli import main

    with pytest.raises(UserError, match="argument --checkpoint-every must be >= 0"):
        LowRankConfig(gfm_checkpoint_every=-1).validate()
    seen = []

    def stand_in(model, proxy, cfg, out_dir, *args, **kwargs):
        seen.append(cfg.gfm_checkpoint_every)
        with open(os.path.join(out_dir, "report.md"), "w") as f:
            f.write("# report\n")

    monkeypatch.setattr(pipeline, "run_lowrank", stand_in)
    out = str(tmp_path / "out")
    assert main(["lowrank", "--output", out, "--no-progress", "--checkpoint-every", "5"]) == 0
    assert main(["lowrank", "--output", out, "--no-progress"]) == 0
    assert seen == [5, 0]
    assert main(["lowrank", "--output", out, "--no-progress", "--checkpoint-every", "-2"]) == 2
    assert "argument --checkpoint-every must be >= 0, got -2" in capsys.readouterr().err
    assert main(["lowrank", "--output", out, "--no-progress", "--gfm-epochs", "3"]) == 2
    assert "gfm_epochs" in capsys.readouterr().err and seen == [5, 0]


def test_pipeline_end_to_end_and_load_compressed(tmp_path):
    model = tiny_vit()
    x = torch.randn(64, 1, 16, 16)
    cfg = LowRankConfig(target_params=0.8, rank_step=16, batch_size=32, gfm_epochs=2, progress=False)
    out = str(tmp_path / "lr")
    report = run_lowrank(model, x, cfg, out, "vitfast_digits_vit", {"embed_dim": 64, "depth": 2, "num_heads": 2},
                         log=lambda *_: None)
    assert report["results"]["aafm+gfm"]["params"] <= report["target_params"]
    assert set(report["results"]) == {"original", "aafm", "svd", "aafm+gfm", "svd+gfm"}
    for f in ("report.json", "report.md", "energy_and_ranks.png", "search.json", "compressed/structure.json"):
        assert os.path.exists(os.path.join(out, f)), f
    loaded = vitfast.load_compressed(os.path.join(out, "compressed"))
    assert sum(p.numel() for p in loaded.parameters()) == report["results"]["aafm+gfm"]["params"]
    with torch.no_grad():  # either file's path loads the folder; a folder without weights is named
        x1 = x[:2]
        torch.testing.assert_close(vitfast.load_compressed(os.path.join(out, "compressed", "structure.json"))(x1),
                                   loaded(x1))
    with pytest.raises(UserError, match="holds no structure.json: not a saved compressed model"):
        vitfast.load_compressed(out)
    structure = json.load(open(os.path.join(out, "compressed", "structure.json")))
    assert structure["layers"] and all(v["rank"] % 16 == 0 for v in structure["layers"].values())
    # A second run reuses the saved search.
    logs = []
    run_lowrank(model, x, cfg, out, "vitfast_digits_vit", {"embed_dim": 64, "depth": 2, "num_heads": 2}, log=logs.append)
    assert any("reusing the sensitivity search" in m for m in logs)


def test_pipeline_bad_inputs(tmp_path):
    cfg = LowRankConfig(progress=False)
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        run_lowrank(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.randn(4, 1, 8, 8), cfg, str(tmp_path), "x")
    with pytest.raises(UserError, match="the fewest this model can reach"):
        run_lowrank(tiny_vit(), torch.randn(8, 1, 16, 16), LowRankConfig(target_params=0.05, progress=False,
                                                                         rank_step=16), str(tmp_path), "x")
    nan_model = tiny_vit()
    with torch.no_grad():
        nan_model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/inf activations"):
        run_lowrank(nan_model, torch.randn(8, 1, 16, 16), LowRankConfig(target_params=0.9, progress=False),
                    str(tmp_path), "x")


def test_image_folder_loading(tmp_path):
    """The proxy set: a random subset of an ImageFolder through the model's timm eval transform."""
    import vitfast.models  # noqa: F401  (registers vitfast_digits_vit)
    from vitfast.data import export_digits_imagefolder
    from vitfast.engine.evaluation import folder_tensors
    from vitfast.errors import UserError
    from vitfast.models.digits_vit import vitfast_digits_vit

    model = vitfast_digits_vit()
    root = export_digits_imagefolder(str(tmp_path / "digits"), split="test")
    x, y = folder_tensors(root, model, limit=50)
    assert x.shape == (50, 1, 16, 16) and y.max() <= 9
    x2, _ = folder_tensors(root, model, limit=50)
    assert torch.equal(x, x2)  # the subset is fixed by the seed
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        folder_tensors(str(tmp_path / "empty"), model)
    with pytest.raises(UserError, match="does not exist"):
        folder_tensors(str(tmp_path / "missing"), model)