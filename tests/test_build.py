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
