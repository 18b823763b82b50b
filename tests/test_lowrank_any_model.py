"""AAFM + GFM on any transformer: padding never enters statistics, sensitivities or losses (a
Hugging Face BERT built here with random weights, padded left or right by any amount; a timm ViT
with a token mask); the repeated blocks are found in timm and Hugging Face models; several ranks
per forward and block replay give the sensitivities of the plain definition."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import transformers

from vitfast.lowrank import LowRankConfig, collect_linear_stats, linear_layers, pca, run_lowrank
from vitfast.lowrank.aafm import sensitivities
from vitfast.lowrank.block_cache import SearchRunner, find_blocks, output_distance
from vitfast.lowrank.layers import LowRankLinear, set_module
from vitfast.lowrank.outputs import resolve_output
from vitfast.lowrank.tokens import resolve_token_mask

VOCAB, MAXLEN = 60, 40


def bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=MAXLEN, attn_implementation="eager")
    return transformers.BertModel(cfg).eval().double()


def sequences(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(1, VOCAB, (int(torch.randint(3, 13, (1,), generator=gen)),), generator=gen) for _ in range(n)]


def padded(seqs, length: int, side: str) -> dict:
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
        ids[i, sl], mask[i, sl] = s, 1
    # real tokens keep positions 0..len-1 whichever side the padding is on
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def unpadded_outputs(model, seqs, layers):
    """Each sequence run alone, no padding: the outputs every layer's statistics must describe."""
    rows = {name: [] for name in layers}
    handles = [layers[n].register_forward_hook(lambda m, i, o, n=n: rows[n].append(o.reshape(-1, o.shape[-1])))
               for n in layers]
    with torch.no_grad():
        for s in seqs:
            model(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long))
    for h in handles:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


def token_layers(model):
    return {n: lin for n, lin in linear_layers(model).items() if not n.startswith("pooler")}


@pytest.mark.parametrize("length,side", [(12, "right"), (12, "left"), (31, "right"), (31, "left")])
def test_padding_leaves_statistics_unchanged(length, side):
    torch.manual_seed(0)
    model = bert()
    seqs = sequences(20, torch.Generator().manual_seed(1))
    layers = token_layers(model)
    exact = unpadded_outputs(model, seqs, layers)
    outs, ins = collect_linear_stats(model, padded(seqs, length, side), layers, batch_size=7, with_inputs=True,
                                     amp=False, progress=False)
    for name, acc in outs.items():
        y = exact[name]
        assert acc.count.item() == y.shape[0] == sum(len(s) for s in seqs)
        torch.testing.assert_close(acc.mean, y.mean(0), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(acc.covariance(), torch.cov(y.T, correction=0), rtol=1e-8, atol=1e-11)
    # without the mask the padding would count (the bug this guards against)
    unmasked, _ = collect_linear_stats(model, padded(seqs, length, side), layers, batch_size=7, amp=False,
                                       progress=False, token_mask=None)
    assert next(iter(unmasked.values())).count.item() == len(seqs) * length


def test_padding_leaves_sensitivities_and_ranks_unchanged(tmp_path):
    torch.manual_seed(0)
    model = bert()
    seqs = sequences(24, torch.Generator().manual_seed(2))
    cfg = LowRankConfig(target_params=0.85, rank_step=8, batch_size=8, gfm_epochs=1, compare_svd=False,
                        progress=False, amp_dtype="float32")
    runs = {}
    for length, side in ((12, "right"), (25, "left")):
        out = str(tmp_path / f"{side}{length}")
        runs[side] = (run_lowrank(model, padded(seqs, length, side), cfg, out, "bert", log=lambda *_: None),
                      json.load(open(os.path.join(out, "search.json")))["layers"])
    (rep_r, search_r), (rep_l, search_l) = runs["right"], runs["left"]
    assert rep_r["ranks"] == rep_l["ranks"] and rep_r["ranks"]
    for a, b in zip(search_r, search_l):
        assert a["name"] == b["name"]
        for k in a["sensitivity"]:
            assert a["sensitivity"][k] == pytest.approx(b["sensitivity"][k], rel=1e-6, abs=1e-12)
    # a text encoder has no logits: outputs are compared as token states (error, cosine)
    assert "cosine_to_original" in rep_r["results"]["aafm+gfm"]
    assert rep_r["results"]["original"]["cosine_to_original"] == pytest.approx(1.0)
    assert "proxy inputs" in rep_r["measured_on"]


def plain_sensitivity(model, inputs, name, lin, basis, mean, k, output_fn, is_logits, mask_fn, batch_size):
    """The definition: the layer replaced by its rank-k LowRankLinear, the whole model run."""
    from vitfast.lowrank.stats import batches

    ref_model_out = []
    total, n = 0.0, 0
    with torch.no_grad():
        for xb in batches(inputs, batch_size):
            ref_model_out.append(output_fn(model, xb))
        set_module(model, name, LowRankLinear.from_afm(lin, basis[:, :k], mean))
        try:
            for xb, ref in zip(batches(inputs, batch_size), ref_model_out):
                total += float(output_distance(output_fn(model, xb), ref, is_logits, mask_fn(xb)))
                n += ref.shape[0]
        finally:
            set_module(model, name, lin)
    return total / n


@pytest.mark.parametrize("which", ["vit", "swin", "bert"])
def test_batched_ranks_and_block_replay_equal_the_definition(which):
    torch.manual_seed(0)
    if which == "bert":
        model = bert()
        inputs = padded(sequences(10, torch.Generator().manual_seed(3)), 14, "right")
    elif which == "vit":
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10,
                                  depth=3).eval().double()
        inputs = torch.randn(10, 3, 32, 32, dtype=torch.float64)
    else:
        model = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7, embed_dim=24,
                                  depths=(2, 2), num_heads=(2, 4), num_classes=10).eval().double()
        inputs = torch.randn(6, 3, 56, 56, dtype=torch.float64)
    example = {k: v[:1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:1]
    output_fn, is_logits = resolve_output("auto", model, example)
    mask_fn = resolve_token_mask("auto")
    layers = linear_layers(model)
    outs, _ = collect_linear_stats(model, inputs, layers, batch_size=4, amp=False, progress=False)
    bases = {n: pca(a)[1] for n, a in outs.items()}
    means = {n: a.mean for n, a in outs.items()}
    fast = SearchRunner(model, inputs, 4, "cpu", False, output_fn, is_logits, mask_fn, search_batch=64)
    slow = SearchRunner(model, inputs, 4, "cpu", False, output_fn, is_logits, mask_fn, blocks=[], search_batch=4)
    assert fast.blockwise and fast.replicas == 16 and not slow.blockwise and slow.replicas == 1
    got = {c.name: c for c in sensitivities(model, fast, layers, bases, means, 8, progress=False)}
    got_slow = {c.name: c for c in sensitivities(model, slow, layers, bases, means, 8, progress=False)}
    checked = 0
    for name in list(layers)[:: max(1, len(layers) // 6)]:  # a spread of layers, early and late blocks
        for k in got[name].ranks[:2]:
            want = plain_sensitivity(model, inputs, name, layers[name], bases[name], means[name], k, output_fn,
                                     is_logits, mask_fn, 4)
            assert got[name].sensitivity[k] == pytest.approx(want, rel=1e-7, abs=1e-14)
            assert got_slow[name].sensitivity[k] == pytest.approx(want, rel=1e-7, abs=1e-14)
            checked += 1
    assert checked >= 4


def test_blocks_are_found_in_timm_and_hugging_face_models():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    assert [n for n, _ in find_blocks(vit)] == ["blocks.0", "blocks.1", "blocks.2"]
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7, embed_dim=24, depths=(2, 2),
                             num_heads=(2, 4))
    assert [n for n, _ in find_blocks(swin)] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0",
                                                 "layers.1.blocks.1"]
    assert [n for n, _ in find_blocks(bert())] == ["encoder.layer.0", "encoder.layer.1"]
    assert [n for n, _ in find_blocks(vit, ["blocks.1"])] == ["blocks.1"]
    with pytest.raises(ValueError, match="argument 'blocks'"):
        find_blocks(vit, [torch.nn.Linear(2, 2)])


def test_vit_token_mask_padded_samples_and_dropped_tokens():
    """A timm ViT: samples padded onto a batch (masked out whole) change nothing; a mask that drops
    the class token gives the statistics of the patch tokens alone."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval().double()
    layers = {n: l for n, l in linear_layers(model).items() if n.startswith("blocks.1.")}
    x = torch.randn(9, 3, 32, 32, dtype=torch.float64)
    real = lambda xb: (xb.flatten(1).abs().sum(1) > 0)[:, None].expand(-1, 17)  # noqa: E731  all-zero = padding
    plain, _ = collect_linear_stats(model, x, layers, batch_size=4, amp=False, progress=False)
    padded_x = torch.cat([x[:5], torch.zeros(3, 3, 32, 32, dtype=torch.float64), x[5:]])
    masked, _ = collect_linear_stats(model, padded_x, layers, batch_size=4, amp=False, progress=False, token_mask=real)
    for name in layers:
        assert masked[name].count.item() == plain[name].count.item() == 9 * 17
        torch.testing.assert_close(masked[name].covariance(), plain[name].covariance(), rtol=1e-9, atol=1e-12)
    no_cls = lambda xb: torch.arange(17).expand(xb.shape[0], 17) > 0  # noqa: E731
    stats, _ = collect_linear_stats(model, x, layers, batch_size=4, amp=False, progress=False, token_mask=no_cls)
    rows = {}
    hooks = [layers[n].register_forward_hook(lambda m, i, o, n=n: rows.setdefault(n, []).append(o[:, 1:]))
             for n in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name in layers:
        y = torch.cat(rows[name]).reshape(-1, rows[name][0].shape[-1])
        torch.testing.assert_close(stats[name].covariance(), torch.cov(y.T, correction=0), rtol=1e-9, atol=1e-12)
    wrong = lambda xb: torch.ones(xb.shape[0], 5, dtype=torch.bool)  # noqa: E731
    with pytest.raises(ValueError, match="does not fit layer 'blocks.1"):
        collect_linear_stats(model, x, layers, batch_size=4, amp=False, progress=False, token_mask=wrong)


def test_configurable_outputs_and_features(tmp_path):
    """The sensitivity compares the pooled embedding and GFM mimics it, both given by name or as a
    function of (model, batch)."""
    torch.manual_seed(0)
    model = bert()
    inputs = padded(sequences(16, torch.Generator().manual_seed(4)), 14, "right")
    seen = []

    def pooled(m, batch):
        seen.append(batch["input_ids"].shape[0])
        return m(**batch).pooler_output

    cfg = LowRankConfig(target_params=0.85, rank_step=8, batch_size=8, gfm_epochs=2, compare_svd=False,
                        progress=False, amp_dtype="float32", output="pooled", features=pooled)
    report = run_lowrank(model, inputs, cfg, str(tmp_path / "out"), "bert", log=lambda *_: None)
    assert seen, "GFM did not use the given feature function"
    assert report["config"]["features"].startswith("function")
    assert 0.0 < report["results"]["aafm+gfm"]["cosine_to_original"] <= 1.0
    with pytest.raises(ValueError, match="an output must be one of"):
        run_lowrank(model, inputs, LowRankConfig(output="cls", progress=False), str(tmp_path / "x"), "bert")
    assert not os.path.exists(tmp_path / "x")  # refused before any work


def test_cli_compresses_a_timm_model_built_for_another_size(tmp_path):
    """`vitfast lowrank --model NAME --model-kwargs img_size=32 ...` feeds the model at the size it
    was built for (timm's pretrained_cfg still says 224), the compressed model reloads with those
    arguments, and an --input-size the model cannot take is refused in one line."""
    import subprocess
    import sys

    import vitfast
    from small_models import VIT32, random_image_folder, save_vit32, vit32_kwargs

    data, ckpt, kw = random_image_folder(tmp_path / "data"), save_vit32(tmp_path / "m.safetensors"), vit32_kwargs()
    base = [sys.executable, "-m", "vitfast", "lowrank", "--model", "vit_tiny_patch16_224", "--checkpoint", ckpt,
            "--num-classes", "2", "--model-kwargs", *VIT32, "--data", data,
            "--proxy-size", "16", "--batch-size", "8", "--rank-step", "16", "--gfm-epochs", "1", "--no-svd-baseline",
            "--no-progress"]
    p = subprocess.run([*base, "--input-size", "64", "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert p.returncode == 2 and "--input-size 64x64" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = subprocess.run([*base, "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    structure = json.load(open(tmp_path / "o" / "compressed" / "structure.json"))
    assert structure["model_kwargs"] == {**kw, "num_classes": 2}
    model = vitfast.load_compressed(str(tmp_path / "o" / "compressed"))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2)
