"""A vitfast._C built on this machine for another one (the GPU machine: Python 3.12, torch 2.11.0,
sm_90), carried there so that the GPU check skips its build step (63 s and 125 s of the 15
device-minutes in the two H100 runs).

    # here: a Python and torch like the device's (a venv of pyenv's 3.12 with the torch 2.11.0 wheel)
    TORCH_CUDA_ARCH_LIST=9.0 VITFAST_BUILD=cuda <py312> setup.py build_ext --inplace
    <py312> scripts/prebuilt.py pack gpu_prebuilt        # _C<suffix>.xz + manifest.json
    # there (scripts/gpu_check.sh does this before its build step):
    python scripts/prebuilt.py install gpu_prebuilt      # exit 0: installed; 1: not usable (says why)
    python scripts/prebuilt.py check                     # imports it and runs one kernel on the GPU

The manifest names the sources the extension was built from (a digest of setup.py and csrc/), the
torch version, the extension suffix (Python version and platform) and the architectures. `install`
refuses anything that differs from the tree and interpreter it runs in, so a stale or foreign build
is never used: the check then builds as before. Importing and using it is the check's next step
(tests/test_build.py), which catches what the manifest cannot (a different libstdc++, driver).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = "manifest.json"


def source_files(root: str = ROOT) -> list[str]:
    """What the build reads from the tree: setup.py and every file below csrc/, sorted."""
    paths = ["setup.py"]
    for base, dirs, files in os.walk(os.path.join(root, "csrc")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        paths += [os.path.relpath(os.path.join(base, f), root).replace(os.sep, "/") for f in files]
    return sorted(paths)


def source_digest(root: str = ROOT) -> str:
    """sha256 over source_files (paths and contents)."""
    h = hashlib.sha256()
    for rel in source_files(root):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def ext_name() -> str:
    return "_C" + sysconfig.get_config_var("EXT_SUFFIX")


def torch_version() -> str:
    import torch

    return torch.__version__


def _archs(value: str | None) -> str:
    return ";".join(sorted(a.strip() for a in (value or "").replace(" ", ";").split(";") if a.strip()))


def expected(root: str = ROOT, archs: str | None = None) -> dict:
    """What a usable prebuilt must say of itself, for this tree, interpreter and arch list."""
    return {"sources": source_digest(root), "torch": torch_version(), "extension": ext_name(),
            "archs": _archs(archs if archs is not None else os.environ.get("TORCH_CUDA_ARCH_LIST"))}


def pack(out_dir: str, root: str = ROOT, archs: str | None = None) -> dict:
    """Compress the built extension of this interpreter (debug sections stripped) into out_dir."""
    src = os.path.join(root, "vitfast", ext_name())
    if not os.path.exists(src):
        raise SystemExit(f"prebuilt pack: {src} does not exist: build it with this interpreter first")
    os.makedirs(out_dir, exist_ok=True)
    manifest = expected(root, archs)
    if not manifest["archs"]:
        raise SystemExit("prebuilt pack: say which architectures it was built for (TORCH_CUDA_ARCH_LIST)")
    with tempfile.TemporaryDirectory() as tmp:
        stripped = os.path.join(tmp, ext_name())
        shutil.copyfile(src, stripped)
        if shutil.which("strip"):  # host DWARF only; the cubins keep their -lineinfo
            r = subprocess.run(["strip", "--strip-debug", stripped], capture_output=True, text=True)
            if r.returncode != 0:  # the file is left as it was
                print(f"prebuilt pack: not stripped ({r.stderr.strip()})", file=sys.stderr)
        with open(stripped, "rb") as f, lzma.open(os.path.join(out_dir, ext_name() + ".xz"), "wb", preset=6) as g:
            shutil.copyfileobj(f, g, 1 << 20)
        manifest["bytes"] = os.path.getsize(stripped)
    manifest["built"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def install(from_dir: str, root: str = ROOT, archs: str | None = None) -> tuple[bool, str]:
    """Unpack the prebuilt into vitfast/ when its manifest matches this tree and interpreter."""
    path = os.path.join(from_dir, MANIFEST)
    if not os.path.exists(path):
        return False, f"no {path}"
    with open(path) as f:
        have = json.load(f)
    want = expected(root, archs)
    diff = [f"{k}: prebuilt {have.get(k)!r}, here {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        return False, "does not match: " + "; ".join(diff)
    packed = os.path.join(from_dir, ext_name() + ".xz")
    if not os.path.exists(packed):
        return False, f"no {packed}"
    dst = os.path.join(root, "vitfast", ext_name())
    tmp = dst + ".part"
    with lzma.open(packed, "rb") as f, open(tmp, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
    if os.path.getsize(tmp) != have.get("bytes"):
        os.remove(tmp)
        return False, f"{packed} unpacked to the wrong size"
    os.replace(tmp, dst)
    return True, f"installed {dst} (built {have.get('built')}, sources {want['sources'][:12]})"


def check() -> tuple[bool, str]:
    """Whether the installed extension imports with CUDA kernels and runs one on this GPU (a cubin
    for another architecture, or a foreign libstdc++, fails here, not in the tests)."""
    sys.path.insert(0, ROOT)
    import torch

    import vitfast
    from vitfast.ops import topk_softmax

    info = vitfast.build_info()
    if not (info.get("loaded") and info.get("cuda")):
        return False, f"vitfast._C not usable: {info.get('error', 'built without CUDA kernels')}"
    if not torch.cuda.is_available():
        return False, "no GPU to run a kernel on"
    logits = torch.randn(64, 1000, device="cuda")
    values, indices = topk_softmax(logits, 5)
    ref = torch.softmax(logits, -1).topk(5)
    torch.cuda.synchronize()
    if not torch.equal(indices.long(), ref.indices) or not torch.allclose(values.float(), ref.values, rtol=1e-3):
        return False, "topk_softmax on the GPU disagrees with torch.topk"
    return True, f"vitfast._C {info.get('version')} for {info.get('cuda_archs')} runs on {torch.cuda.get_device_name()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("pack", "install", "check", "digest"))
    ap.add_argument("dir", nargs="?", default="gpu_prebuilt")
    ap.add_argument("--root", default=ROOT, help="the tree whose sources and vitfast/ it packs (default: this one)")
    args = ap.parse_args(argv)
    if args.action == "digest":
        print(source_digest(args.root))
        return 0
    if args.action == "pack":
        m = pack(args.dir, root=args.root)
        print(f"packed {m['extension']} ({m['bytes'] / 2**20:.1f} MiB stripped) for torch {m['torch']}, "
              f"archs {m['archs']}, sources {m['sources'][:12]} -> {args.dir}")
        return 0
    ok, why = check() if args.action == "check" else install(args.dir, root=args.root)
    print(f"prebuilt: {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
