"""Build vitfast and its extension vitfast._C.

Environment switches:
  VITFAST_BUILD=auto|cpu|cuda   auto (default): compile the CUDA kernels whenever nvcc and a CUDA
                                build of torch are present -- a GPU is not needed to compile.
  TORCH_CUDA_ARCH_LIST          default "8.0;9.0+PTX": Ampere (A100), Hopper (H100/H200), and PTX
                                that newer GPUs (Blackwell) JIT-compile at load.
  MAX_JOBS                      parallel compile jobs (default: all cores).
  VITFAST_DEBUG=1               -O0 -g and device debug info.
  VITFAST_SANITIZE=address      host code built with AddressSanitizer (run Python with libasan
                                preloaded: scripts/cpu_memcheck.sh)
"""
import glob
import os
import subprocess
import sys

from setuptools import find_packages, setup


def _toolkit_home():
    """CUDA_HOME at the toolkit that holds nvcc, even when nvcc on PATH is a wrapper script
    outside it (torch would otherwise guess the wrapper's parent, e.g. /usr/local)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = cand
            return


_toolkit_home()

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0+PTX"


def want_cuda() -> bool:
    mode = os.environ.get("VITFAST_BUILD", "auto").lower()
    if mode not in ("auto", "cpu", "cuda"):
        sys.exit(f"VITFAST_BUILD must be auto, cpu or cuda, got {mode!r}")
    have = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "cuda" and not have:
        sys.exit("VITFAST_BUILD=cuda but no nvcc (CUDA_HOME) or torch is a CPU build "
                 f"(CUDA_HOME={cpp_extension.CUDA_HOME}, torch.version.cuda={torch.version.cuda})")
    return have if mode == "auto" else mode == "cuda"


def wheel_cuda_include() -> list:
    """torch's CUDA headers include cusparse.h/cublas*.h; a bare toolkit may lack them, while the
    torch wheel's nvidia/cu1x/include has them. Searched *after* everything else (-idirafter), so the
    toolkit's own headers always win."""
    if cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia  # namespace package shipped with the CUDA wheels of torch
    except ImportError:
        return []
    major = torch.version.cuda.split(".")[0]
    for base in nvidia.__path__:
        inc = os.path.join(base, f"cu{major}", "include")
        if os.path.exists(os.path.join(inc, "cusparse.h")):
            return ["-idirafter", inc]
    return []


def torch_uses_openmp() -> bool:
    import torch

    return sys.platform.startswith("linux") and bool(getattr(torch._C, "has_openmp", False))


def write_build_config(with_cuda: bool, archs: str) -> str:
    out = os.path.join(ROOT, "build", "generated")
    os.makedirs(out, exist_ok=True)
    try:
        compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        compiler = "unknown"
    compiler = compiler.replace('"', "'")
    lines = [
        "#pragma once",
        f'#define VITFAST_VERSION "{VERSION}"',
        f'#define VITFAST_TORCH_VERSION "{torch.__version__}"',
        f'#define VITFAST_COMPILER "{compiler}"',
    ]
    if with_cuda:
        lines += ["#define VITFAST_WITH_CUDA 1", f'#define VITFAST_CUDA_ARCHS "{archs}"']
    path = os.path.join(out, "vitfast_build_config.h")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:  # keep ninja's timestamps stable
        with open(path, "w") as f:
            f.write(text)
    return out


def shared_libstdcxx() -> list[str]:
    """Link flags that bind vitfast._C to the libstdc++.so this Python process runs (the one torch
    loaded), found in /proc/self/maps. The first H100 run's toolchain (/opt/gcc, gcc 13) linked
    libstdc++ into _C statically: its private, never-initialised iostream/locale copy crashed
    (SIGSEGV) the first time an error message formatted an int. Naming the shared library first on
    the link line resolves those symbols there, so no archive member is pulled in. Linux only."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except OSError:
        return []
    paths = sorted(p for p in paths if os.path.isabs(p) and os.path.exists(p))
    return [paths[0]] if paths else []


def extensions():
    with_cuda = want_cuda()
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    debug = os.environ.get("VITFAST_DEBUG") == "1"
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_glue = [s for s in sources if s.endswith("_cuda.cpp")]
    sources = [s for s in sources if s not in cuda_glue]
    include_dirs = [os.path.join(ROOT, "csrc"), write_build_config(with_cuda, archs)]
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    sanitize = os.environ.get("VITFAST_SANITIZE", "")
    if sanitize not in ("", "address"):
        sys.exit(f"VITFAST_SANITIZE must be empty or address, got {sanitize!r}")
    san_flags = ["-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else []
    cxx += san_flags
    # `omp simd` loops of the CPU kernels vectorise (no OpenMP runtime needed); no-trapping-math
    # lets the compiler if-convert float compares (results unchanged: FP traps are never enabled)
    cxx += ["-fvisibility=hidden", "-fopenmp-simd", "-fno-trapping-math"]
    if torch_uses_openmp():
        # at::parallel_for is inline: without -fopenmp here it runs serially in our ops. Compile-only
        # flag on purpose: the GOMP_* calls bind to the OpenMP runtime torch already loaded
        # (libtorch_cpu's dependency), never to a second copy of libgomp.
        cxx += ["-fopenmp"]
    if with_cuda:
        sources += cuda_glue + sorted(glob.glob("csrc/**/*.cu", recursive=True))
        cxx += ["-DVITFAST_WITH_CUDA"] + wheel_cuda_include()
        nvcc = ["-O3", "-lineinfo", "-DVITFAST_WITH_CUDA"]
        if debug:
            nvcc += ["-G", "-O0"]
        ext = cpp_extension.CUDAExtension(
            "vitfast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=shared_libstdcxx() + san_flags)
    else:
        ext = cpp_extension.CppExtension(
            "vitfast._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
            extra_link_args=shared_libstdcxx() + san_flags)
    what = f"CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}" if with_cuda else "CPU kernels only"
    print(f"vitfast: building vitfast._C with {what}; {len(ext.sources)} sources, MAX_JOBS={os.environ['MAX_JOBS']}",
          flush=True)
    return [ext]


setup(
    name="vitfast",
    version=VERSION,
    description="Fused CUDA kernels and pipelines to make vision transformers small and fast to train",
    packages=find_packages(include=["vitfast", "vitfast.*"]),
    package_data={"vitfast": ["assets/*"]},
    python_requires=">=3.10",
    # what the default commands need: scikit-learn ships the embedded digits, matplotlib draws the
    # reports' plots, pyyaml reads --config files
    install_requires=["torch>=2.4", "numpy", "timm", "safetensors", "tqdm", "scikit-learn", "matplotlib", "pillow",
                      "pyyaml"],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    entry_points={"console_scripts": ["vitfast=vitfast.cli:main"]},
    zip_safe=False,
)
