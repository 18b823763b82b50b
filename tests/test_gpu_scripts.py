"""The GPU check's scripts work before they meet a GPU (device minutes are scarce): the sanitizer
cases and the Nsight Compute cases run on the CPU against the references, the benchmark runner's
quick mode produces its report and bars, gpu_check.sh parses and knows its phases."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_sanitize_cases_cover_every_op_and_pass_on_cpu():
    p = run("scripts/sanitize_cases.py", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "all results match the references" in p.stdout
    p = run("scripts/sanitize_cases.py", "--device", "cpu", "--smallest", "head_mix_attention")
    assert p.returncode == 0 and "smallest" in p.stdout, p.stderr[-3000:]


def test_ncu_cases_run_on_cpu():
    p = run("benchmarks/ncu_cases.py", "--device", "cpu", "--small")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "head_mix_attention" in p.stdout and "window_attention" in p.stdout


def test_recheck_profiles_the_kernels_no_gpu_has_profiled():
    """The recheck's ncu step (--match in gpu_check.sh) takes the register, streaming and head-split
    cases, not the tile kernels, the SDPA route or the ops the first run profiled."""
    import re
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    regex = re.search(r"--match '([^']+)'", text).group(1)
    p = run("benchmarks/ncu_cases.py", "--device", "cpu", "--small", "--match", regex)
    assert p.returncode == 0, p.stderr[-3000:]
    names = p.stdout.strip().splitlines()[-1].removeprefix("profiled: ").split("; ")
    assert len(names) == 8 and sum("(streaming" in n for n in names) == 4
    assert any("head-split" in n for n in names) and "window_attention swin_t stage1 bf16 fwd+bwd" in names
    assert not any(t in n for n in names for t in ("tile", "sdpa", "pipeline", "topk", "covariance", "soft_target"))


def test_benchmark_runner_quick_on_cpu(tmp_path):
    out = tmp_path / "r.json"
    p = run("benchmarks/run_gpu.py", "--device", "cpu", "--quick", "--json", str(out), "--markdown",
            str(tmp_path / "r.md"))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    ops = {c["op"] for c in report["cases"]}
    assert {"topk_softmax", "covariance_update", "window_attention", "head_mix_attention",
            "dense_soft_target_ce loss+grad"} <= ops
    assert any("head_mix_attention" in b["what"] for b in report["bars"])
    assert "Head-mixing attention" in (tmp_path / "r.md").read_text()


def test_minivit_benchmark_quick_on_cpu(tmp_path):
    out = tmp_path / "m.json"
    p = run("benchmarks/minivit_gpu.py", "--device", "cpu", "--quick", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["results"]) == 7 and len(report["bars"]) == 6
    assert "mini_deit_small (sdpa route)" in report["results"]


def test_minivit_benchmark_subsets_join_through_previous(tmp_path):
    """`gpu_check.sh bars` measures the models of two bars, `bars2` a third model against them."""
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    p = run("benchmarks/minivit_gpu.py", "--device", "cpu", "--quick", "--json", str(first), "--models",
            "deit_small_patch16_224", "mini_deit_small (fused)", "--profile-top", "5")
    assert p.returncode == 0, p.stderr[-3000:]
    a = json.loads(first.read_text())
    assert list(a["results"]) == ["deit_small_patch16_224", "mini_deit_small (fused)"]
    # --profile-top: each model's costliest operators, costliest first, in the JSON and the report
    for r in a["results"].values():
        ms = [o["ms_per_step"] for o in r["top_ops"]]
        assert len(ms) == 5 and ms == sorted(ms, reverse=True) and 0 < sum(o["share"] for o in r["top_ops"]) <= 1
    assert p.stdout.count("the operators with the most self time") == 2
    assert list(a["bars"]) == ["mini_deit_small (fused) vs deit_small_patch16_224"]
    p = run("benchmarks/minivit_gpu.py", "--device", "cpu", "--quick", "--json", str(second), "--models",
            "mini_deit_small (eager talking heads)", "--previous", str(first))
    assert p.returncode == 0, p.stderr[-3000:]
    b = json.loads(second.read_text())
    assert b["results"]["mini_deit_small (fused)"] == a["results"]["mini_deit_small (fused)"]
    assert "mini_deit_small (fused) vs mini_deit_small (eager talking heads)" in b["bars"]
    assert "(earlier run, --previous)" in p.stdout
    p = run("benchmarks/minivit_gpu.py", "--device", "cpu", "--quick", "--models", "mini_deit_large")
    assert p.returncode == 2 and "unknown" in p.stderr


def test_model_benchmark_reports_what_it_measured_when_its_time_limit_strikes(tmp_path):
    """timeout(1) ends a gpu_check step with SIGTERM: the markdown report of the variants measured
    so far is still appended, marked as cut short."""
    import signal
    md, out = tmp_path / "r.md", tmp_path / "m.json"
    p = subprocess.Popen([sys.executable, "benchmarks/window_models_gpu.py", "--device", "cpu", "--quick",
                          "--models", "swin_tiny_patch4_window7_224", "--variants", "eager", "patched", "eager",
                          "patched", "--reps", "2", "--json", str(out), "--append-markdown", str(md)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:  # the first variant measured
        if line.startswith("swin_tiny_patch4_window7_224 eager"):
            break
    p.send_signal(signal.SIGTERM)
    p.stdout.read()
    assert p.wait(timeout=120) == 124
    report = md.read_text()
    assert "**cut short**" in report and "| swin_tiny_patch4_window7_224 | eager |" in report
    assert json.loads(out.read_text())["complete"] is False


def test_minivit_relations_benchmark_quick_on_cpu(tmp_path):
    out = tmp_path / "rel.json"
    p = run("benchmarks/minivit_relations.py", "--device", "cpu", "--quick", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())["results"]
    assert all(0 < v["step_ms"] for k, v in r.items() if isinstance(v, dict) and "step_ms" in v)
    # the shares as the script defines them (step times of a loaded 2-core machine can swing
    # either way, so no range is asserted on the values themselves)
    full, base = r["+ hidden relations (full)"]["step_ms"], r["predictions only"]["step_ms"]
    assert r["relation_share"] == pytest.approx((full - base) / full)
    eager = r["full, eager softmaxes (chunked)"]["step_ms"]
    assert r["relation_share_chunked"] == pytest.approx((eager - base) / eager)
    assert set(r["losses_alone"]) == {"fused", "chunked", "autograd"} and r["width"] == 384


def test_cpu_dense_ce_benchmark_quick(tmp_path):
    out = tmp_path / "d.json"
    p = run("benchmarks/cpu_dense_ce.py", "--quick", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["relation_losses_ms"]) == {"fused", "chunked", "autograd"}
    assert all(v > 0 for t in r["op_rows"]["ms"].values() for v in t.values())


def test_host_overhead_benchmark_on_cpu(tmp_path):
    out = tmp_path / "h.json"
    p = run("benchmarks/host_overhead.py", "--device", "cpu", "--reps", "20", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())["results"]
    assert len(r) == 4 and all(v["vitfast_us"] > 0 and v["baseline_us"] > 0 for v in r.values())


@pytest.mark.parametrize("script, rows", [
    ("cpu_attention_shapes.py", ["Swin-T s1: 256 x 49", "DeiT-Ti: 16 x 197"]),
    ("cpu_head_mix.py", ["| vitfast (fused) |", "| SDPA, no mixes (floor) |", "| Mini (multiplex, share=2) |"]),
    ("cpu_window_attention.py", ["| shifted | vitfast |", "| tiny_vit_5m_224 | vitfast.patch |"]),
])
def test_cpu_attention_reports_run_quick(tmp_path, script, rows):
    """The CPU attention reports (README's CPU figures come from them) still run; --quick says in
    its header that its numbers are no measurement."""
    md = tmp_path / "r.md"
    extra = ["--batch", "1"] if script != "cpu_attention_shapes.py" else []
    p = run(f"benchmarks/{script}", "--quick", "--threads", "1", "--markdown", str(md), *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    text = md.read_text()
    assert "1 thread" in text and "smoke run, not a measurement" in text
    for row in rows:
        line = next(l for l in text.splitlines() if row in l)
        times = [float(c) for c in line.strip("|").split("|")[-2:]]
        assert all(t > 0 for t in times), line


def test_save_logits_time_split_benchmark_on_cpu(tmp_path):
    p = run("benchmarks/cpu_save_logits.py", "--workers", "1", "--images", "20", "--epochs", "1", "--teacher",
            "vit_tiny_patch16_224", "--markdown", str(tmp_path / "s.md"))
    assert p.returncode == 0, p.stderr[-3000:]
    table = (tmp_path / "s.md").read_text()
    assert table.count("| 1 |") == 2 and "waiting for data" in table


def test_checkpoint_costs_benchmark_quick(tmp_path):
    """benchmarks/cpu_checkpoint_costs.py (the numbers of benchmarks/NOTES.md's Pipelines section)."""
    p = run("benchmarks/cpu_checkpoint_costs.py", "--calls", "200", "--mb", "0.5", "--dir", str(tmp_path),
            "--markdown", str(tmp_path / "c.md"))
    assert p.returncode == 0, p.stderr[-3000:]
    table = (tmp_path / "c.md").read_text()
    assert "| blocking (`stop_agreed`, back to back) | 200 |" in table and "| pipelined" in table
    assert "| 0.5 MB (9 batches of 256) |" in table
    assert sorted(os.listdir(tmp_path)) == ["c.md"]  # its store went with its temporary folder


def test_checkpoint_costs_benchmark_stops_when_a_vote_worker_dies():
    """A worker that dies at start (an import error) ends the wait with its exit code: before, the
    other ranks sat in the vote and the benchmark hung for its 600 s limit."""
    import multiprocessing as mp
    import time

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from cpu_checkpoint_costs import _result
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    ctx = mp.get_context("spawn")
    dead = ctx.Process(target=os._exit, args=(3,))
    waiting = ctx.Process(target=time.sleep, args=(60,))  # a rank blocked in the vote
    for p in (dead, waiting):
        p.start()
    t = time.monotonic()
    with pytest.raises(SystemExit, match="rank 0 exited with 3"):
        _result(ctx.Queue(), [dead, waiting], limit_s=60)
    assert time.monotonic() - t < 30
    waiting.join(timeout=10)
    assert waiting.exitcode is not None  # the survivor was stopped, not left behind


def test_gpu_check_script_parses_and_rejects_unknown_phases():
    assert subprocess.run(["bash", "-n", "scripts/gpu_check.sh"], cwd=ROOT).returncode == 0
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    for phase in ("first)", "recheck)", "second)", "bars)", "bars2)", "later)"):
        assert phase in text


def test_window_models_benchmark_quick_on_cpu(tmp_path):
    """`gpu_check.sh second` (Swin / TinyViT end to end) and `later` (CaiT) run this script; a crash
    there would cost a device call."""
    out = tmp_path / "models.json"
    p = run("benchmarks/window_models_gpu.py", "--device", "cpu", "--quick", "--json", str(out),
            "--models", "swin_tiny_patch4_window7_224", "tiny_vit_21m_224", "cait_xxs24_224")
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["complete"] and set(report["results"]) == {"swin_tiny_patch4_window7_224", "tiny_vit_21m_224",
                                                              "cait_xxs24_224"}
    assert all(set(r) >= {"eager", "patched"} for r in report["results"].values())
    assert {b["what"].split(" ")[0] for b in report["bars"]} == {"swin_tiny_patch4_window7_224", "tiny_vit_21m_224"}


def test_gpu_check_summary_quotes_only_the_bars_this_call_measured(tmp_path):
    """A phase that appends to a copy of benchmarks/RESULTS.md must not quote that file's older
    bars in its summary as if it had measured them (gpu_check.sh's results_md and finish)."""
    text = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    functions = text[text.index("RESULTS_BASE=0"):text.index("\n}\n", text.index("finish() {")) + 3]
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    script = f"""set -uo pipefail
cd {ROOT!r}
OUTDIR={str(out)!r}; PHASE=bars; T0=$SECONDS
declare -a ORDER=(minivit); declare -A STATUS=([minivit]="PASS 3s")
{functions}
results_md
echo '| new bar measured here | 1.2x | PASS |' >>"$OUTDIR/RESULTS.md"
finish
"""
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    summary = (out / "summary.txt").read_text()
    old = [line for line in open(os.path.join(ROOT, "benchmarks", "RESULTS.md")).read().splitlines()
           if line.endswith(("| PASS |", "| FAIL |"))]
    assert old, "benchmarks/RESULTS.md has bars: the test needs them to mean anything"
    assert "| new bar measured here | 1.2x | PASS |" in summary and "| minivit | PASS 3s |" in summary
    assert not any(line in summary for line in old)
    assert (out / "logs.tar.xz").exists()
