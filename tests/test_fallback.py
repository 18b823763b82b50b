"""Without its extension vitfast still imports, says so, and computes the same results."""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import vitfast
from vitfast import _ext


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env})


def test_import_without_extension_warns_and_falls_back():
    proc = run_python("""
        import torch, vitfast
        from vitfast.ops.reference import topk_softmax_reference, sparse_soft_target_cross_entropy_reference
        assert not vitfast.extension_loaded()
        x = torch.randn(5, 300)
        v, i = vitfast.topk_softmax(x, 7)
        rv, ri = topk_softmax_reference(x, 7)
        assert torch.equal(i, ri) and torch.equal(v, rv)
        s = torch.randn(5, 300, dtype=torch.float64, requires_grad=True)
        loss = vitfast.sparse_soft_target_cross_entropy(s, v, i)
        ref = sparse_soft_target_cross_entropy_reference(s, v, i, 300)
        torch.testing.assert_close(loss, ref)
        loss.backward()
        print("OK")
    """, VITFAST_DISABLE_EXTENSION="1")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    assert "could not be imported" in proc.stderr and "pure-PyTorch reference" in proc.stderr


def test_info_without_extension():
    proc = run_python("from vitfast.cli import main; main(['info'])", VITFAST_DISABLE_EXTENSION="1")
    assert proc.returncode == 0, proc.stderr
    assert "extension: NOT loaded" in proc.stdout
    assert "reference fallback" in proc.stdout


def test_fallback_warns_once_per_op_and_device(monkeypatch):
    monkeypatch.setattr(_ext, "native", lambda device: False)
    monkeypatch.setattr(_ext, "_warned", set())
    x = torch.randn(3, 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            vitfast.topk_softmax(x, 4)
    msgs = [str(w.message) for w in caught if "pure-PyTorch reference" in str(w.message)]
    assert len(msgs) == 1 and "vitfast.topk_softmax" in msgs[0]


def test_fallback_checks_arguments_like_the_kernel(monkeypatch):
    monkeypatch.setattr(_ext, "native", lambda device: False)
    monkeypatch.setattr(_ext, "_warned", set())  # earlier tests may have warned already
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="argument 'k' must be in"):
        vitfast.topk_softmax(torch.randn(3, 40), 41)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("bad", ["duplicate", "range"])
def test_cuda_bad_indices_fail_loudly(bad):
    # A device-side trap poisons the CUDA context, so it runs in its own process.
    proc = run_python(f"""
        import torch, vitfast
        v, i = vitfast.topk_softmax(torch.randn(4, 50, device="cuda"), 5)
        i = i.clone()
        if "{bad}" == "duplicate":
            i[2, 3] = i[2, 0]
        else:
            i[1, 4] = 50
        loss = vitfast.sparse_soft_target_cross_entropy(torch.randn(4, 50, device="cuda"), v, i)
        torch.cuda.synchronize()
        print("NO ERROR", loss.item())
    """)
    assert proc.returncode != 0 and "NO ERROR" not in proc.stdout
    expected = "duplicate entries in indices row 2" if bad == "duplicate" else "indices out of [0, 50) in row 1"
    assert expected in proc.stdout + proc.stderr
