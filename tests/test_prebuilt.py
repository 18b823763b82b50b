"""scripts/prebuilt.py: a prebuilt extension is installed only into the tree and interpreter it was
built for (sources, torch, Python/platform suffix, architectures), byte for byte."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("prebuilt", os.path.join(ROOT, "scripts", "prebuilt.py"))
prebuilt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prebuilt)


def _tree(root, payload=None):
    os.makedirs(os.path.join(root, "csrc", "op"), exist_ok=True)
    os.makedirs(os.path.join(root, "vitfast"), exist_ok=True)
    with open(os.path.join(root, "setup.py"), "w") as f:
        f.write("setup()\n")
    with open(os.path.join(root, "csrc", "op", "kernel.cu"), "w") as f:
        f.write("__global__ void k() {}\n")
    if payload is not None:
        with open(os.path.join(root, "vitfast", prebuilt.ext_name()), "wb") as f:
            f.write(payload)
    return str(root)


def test_pack_then_install_restores_the_extension(tmp_path):
    payload = os.urandom(3000) + bytes(5000)
    built = _tree(tmp_path / "built", payload)
    m = prebuilt.pack(str(tmp_path / "carry"), root=built, archs="9.0")
    assert m["archs"] == "9.0" and m["extension"] == prebuilt.ext_name() and len(m["sources"]) == 64
    there = _tree(tmp_path / "there")
    ok, why = prebuilt.install(str(tmp_path / "carry"), root=there, archs="9.0")
    assert ok, why
    with open(os.path.join(there, "vitfast", prebuilt.ext_name()), "rb") as f:
        assert f.read() == payload


@pytest.mark.parametrize("change", ["source", "new_file", "archs"])
def test_install_refuses_another_tree_or_arch(tmp_path, change):
    built = _tree(tmp_path / "built", b"\x7fELF-not-really")
    prebuilt.pack(str(tmp_path / "carry"), root=built, archs="9.0")
    there = _tree(tmp_path / "there")
    archs = "9.0"
    if change == "source":
        with open(os.path.join(there, "csrc", "op", "kernel.cu"), "a") as f:
            f.write("// edited after the build\n")
    elif change == "new_file":
        with open(os.path.join(there, "csrc", "op", "extra.h"), "w") as f:
            f.write("#pragma once\n")
    else:
        archs = "8.0;9.0"
    ok, why = prebuilt.install(str(tmp_path / "carry"), root=there, archs=archs)
    assert not ok
    assert ("archs" if change == "archs" else "sources") in why
    assert not os.path.exists(os.path.join(there, "vitfast", prebuilt.ext_name()))


def test_install_without_a_prebuilt_says_so(tmp_path):
    ok, why = prebuilt.install(str(tmp_path / "nothing"), root=_tree(tmp_path / "t"), archs="9.0")
    assert not ok and "manifest.json" in why


def test_digest_covers_every_compiled_source():
    # setup.py compiles csrc/**/*.cpp and *.cu, which include csrc/ headers: all of them are digested
    import glob
    files = set(prebuilt.source_files(ROOT))
    compiled = {os.path.relpath(p, ROOT) for ext in ("cpp", "cu", "h", "cuh")
                for p in glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True)}
    assert compiled and compiled <= files and "setup.py" in files
    a = prebuilt.source_digest(ROOT)
    assert a == prebuilt.source_digest(ROOT) and len(a) == 64
