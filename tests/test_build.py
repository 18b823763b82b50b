"""The extension is there, says what it holds, and the CLI reports it."""
import json
import os
import subprocess
import sys

import torch

import vitfast
from vitfast import _ext
from vitfast.ops import OPS


def test_extension_loaded():
    info = vitfast.build_info()
    assert info["loaded"], info
    assert info["version"] == vitfast.__version__
    # the build registers exactly the ops of vitfast.ops.OPS (the one list)
    assert set(info["ops"]) == {name for op in OPS.values() for name in op.torch_ops}
    for op in info["ops"]:
        assert hasattr(torch.ops.vitfast, op)
    for op in OPS.values():
        assert os.path.isdir(os.path.join(os.path.dirname(os.path.dirname(__file__)), "csrc", op.csrc))


def test_cuda_kernels_compiled_when_required():
    # CI sets VITFAST_BUILD=cuda: there the CUDA sources must have compiled (no GPU needed).
    if os.environ.get("VITFAST_BUILD") == "cuda":
        info = vitfast.build_info()
        assert info["cuda"] is True
        assert "9.0" in info["cuda_archs"]
        assert _ext.native(torch.device("cuda"))


def test_info_cli_json():
    out = subprocess.run([sys.executable, "-m", "vitfast", "info", "--json"], capture_output=True, text=True,
                         check=True).stdout
    report = json.loads(out)
    assert report["vitfast"] == vitfast.__version__
    assert report["ops"]["topk_softmax"]["cpu"] == "native"
    assert report["build"]["loaded"] is True


def test_info_cli_text():
    out = subprocess.run([sys.executable, "-m", "vitfast", "info"], capture_output=True, text=True, check=True).stdout
    assert "extension: vitfast._C loaded" in out
    assert "topk_softmax" in out and "CUDA kernels:" in out


def test_version_is_one_line():
    for env in ({}, {"VITFAST_DISABLE_EXTENSION": "1"}):
        p = subprocess.run([sys.executable, "-W", "ignore", "-m", "vitfast", "--version"], capture_output=True,
                           text=True, env={**os.environ, "COLUMNS": "40", **env})
        assert p.returncode == 0 and p.stdout.count("\n") == 1, p
        assert p.stdout.startswith(f"vitfast {vitfast.__version__} (torch {torch.__version__}; ")
        assert ("extension not loaded" in p.stdout) == bool(env), p.stdout
        if not env:
            info = vitfast.build_info()
            assert f"extension built for torch {info['torch_version']}, " in p.stdout
            assert (f"CUDA kernels for {info['cuda_archs']}" if info["cuda"] else "CPU only") in p.stdout


def test_extension_uses_the_shared_libstdcxx():
    """vitfast._C defines no libstdc++ stream code of its own: a toolchain that links libstdc++
    statically (the first H100 run's /opt/gcc) gave _C a private, uninitialised iostream copy and
    every error message with a number in it crashed the process. setup.py names the shared library
    torch runs on; this checks the result, and that a native error message with numbers formats."""
    import shutil

    import pytest

    if shutil.which("nm") is None:
        pytest.skip("no nm")
    so = vitfast._C.__file__
    defined = subprocess.run(["nm", "-C", "--defined-only", so], capture_output=True, text=True).stdout
    embedded = [line for line in defined.splitlines() if "std::ostream::_M_insert" in line or "std::locale::locale" in line]
    assert not embedded, embedded[:5]
    with pytest.raises(ValueError, match="k"):
        torch.ops.vitfast.topk_softmax(torch.randn(2, 3), 5)  # the C++ check formats ints into its message


def test_build_switches_reject_unknown_values():
    """setup.py names the switch and the value it does not know, before compiling anything."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for var, value in (("VITFAST_SANITIZE", "thread"), ("VITFAST_BUILD", "rocm")):
        p = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, capture_output=True, text=True,
                           env={**os.environ, var: value}, timeout=120)
        assert p.returncode != 0 and var in p.stderr and repr(value) in p.stderr, (var, p.stderr[-500:])
