"""Build ``musefast._C`` against the torch that runs.

Default: just-in-time on first use with ``torch.utils.cpp_extension.load`` + ninja into a
cache folder (FlashInfer's approach), so ``pip install -e .`` compiles nothing and can never
link against a second torch from an isolated build environment. Optional ahead-of-time build:
``MUSEFAST_AOT=1 pip install -e . --no-build-isolation`` (see setup.py).

CUDA sources are compiled only when torch is a CUDA build and nvcc is found. Failures never
break musefast: :func:`extension` returns ``None`` and :func:`extension_status` says why.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

EXTENSION_NAME = "musefast_C"

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None, "how": None, "seconds": None}


def csrc_dir() -> Path:
    """The C++/CUDA sources: repo-root csrc/ (source checkout, editable) or the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"musefast C++ sources not found next to {here}")


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels will not be compiled, or None if they will."""
    import torch

    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not (shutil.which("nvcc") or Path(CUDA_HOME, "bin", "nvcc").exists()):
        return "nvcc not found (set CUDA_HOME)"
    return None


def sources(with_cuda: bool) -> list[str]:
    root = csrc_dir()
    files = sorted(glob.glob(str(root / "*.cpp")))
    if with_cuda:
        # *.cu are pure CUDA (raw pointers + cudaStream_t); cuda/*.cpp is the thin torch glue
        # that needs torch's CUDA headers, which CPU builds of torch do not ship.
        files += sorted(glob.glob(str(root / "cuda" / "*.cu")))
        files += sorted(glob.glob(str(root / "cuda" / "*.cpp")))
    return files


def _flags(with_cuda: bool, native: bool) -> tuple[list[str], list[str]]:
    # -fopenmp at compile time only: at::parallel_for is a header template built on OpenMP
    # pragmas; its GOMP_* symbols then resolve to the libgomp that torch itself loads, so
    # torch.set_num_threads governs our kernels too (no second OpenMP runtime).
    # No -std here: torch's extension builder picks the standard its headers need (C++17 for
    # torch 2.13, C++20 for 2.14+), and an explicit one would override it.
    cflags = ["-O3", "-ffp-contract=fast", "-fopenmp"]
    if native:  # JIT builds run where they are compiled, so the host's vector units are fair game
        cflags.append("-march=native")
    cuda_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
    if with_cuda:
        cflags.append("-DMUSEFAST_WITH_CUDA")
        cuda_flags.append("-DMUSEFAST_WITH_CUDA")
    return cflags, cuda_flags


def _host_isa_tag() -> str:
    """Machine + a hash of the CPU's feature flags: JIT builds use -march=native, so a cache
    shared between hosts (an NFS home) must not hand one host's binary to another."""
    import hashlib
    import platform

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:8]}"


def cache_dir(with_cuda: bool) -> Path:
    import torch

    base = Path(os.environ.get("MUSEFAST_CACHE", Path.home() / ".cache" / "musefast"))
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{_host_isa_tag()}"
    tag += f"-cu{torch.version.cuda}" if with_cuda else "-cpu"
    path = base / "ext" / tag.replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


# torch's JIT loader serialises builds with a ``lock`` file in the build folder and waits for it
# to disappear; a build killed half-way (Ctrl-C, OOM, a killed job) leaves it behind and every
# later import would wait forever. No build of this extension takes anywhere near this long.
STALE_LOCK_SECONDS = 20 * 60


def clear_stale_build_lock(build_dir: Path, max_age_s: float = STALE_LOCK_SECONDS) -> bool:
    """Remove ``build_dir/lock`` when it is older than ``max_age_s``; True if removed."""
    lock = Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    warnings.warn(f"removing a stale extension build lock ({lock}, {age / 60:.0f} min old) left by an "
                  "interrupted build", RuntimeWarning, stacklevel=2)
    lock.unlink(missing_ok=True)
    return True


def _jit_build():
    from torch.utils.cpp_extension import load

    with_cuda = cuda_unavailable_reason() is None
    cflags, cuda_flags = _flags(with_cuda, native=True)
    clear_stale_build_lock(cache_dir(with_cuda))
    return load(
        name=EXTENSION_NAME,
        sources=sources(with_cuda),
        extra_cflags=cflags,
        extra_cuda_cflags=cuda_flags,
        extra_include_paths=[str(csrc_dir())],
        build_directory=str(cache_dir(with_cuda)),
        with_cuda=with_cuda,
        verbose=os.environ.get("MUSEFAST_VERBOSE_BUILD") == "1",
    )


def extension():
    """The compiled extension module (ops registered under ``torch.ops.musefast``), or None."""
    with _lock:
        if _state["tried"]:
            return _state["module"]
        _state["tried"] = True
        if os.environ.get("MUSEFAST_NO_EXT") == "1":
            _state["error"] = "disabled by MUSEFAST_NO_EXT=1"
            return None
        start = time.perf_counter()
        try:
            from musefast import _C as module  # ahead-of-time build, if there is one

            _state["how"] = "ahead-of-time (musefast._C)"
        except ImportError:
            try:
                module = _jit_build()
                _state["how"] = "just-in-time (cached in %s)" % cache_dir(cuda_unavailable_reason() is None)
            except Exception as exc:  # a failed build must never break the pure backends
                _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
                return None
        _state["module"], _state["seconds"] = module, time.perf_counter() - start
        return module


def _aot_module_present() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("musefast._C") is not None
    except (ImportError, ValueError):
        return False


def needs_first_build() -> bool:
    """True when using the extension now would compile it first (no ahead-of-time module,
    nothing in the JIT cache for this torch/host, not disabled, not tried yet)."""
    if _state["tried"] or os.environ.get("MUSEFAST_NO_EXT") == "1" or _aot_module_present():
        return False
    built = cache_dir(cuda_unavailable_reason() is None) / f"{EXTENSION_NAME}.so"
    return not built.is_file()


def build_in_background() -> Path:
    """Start the first JIT build in a detached process and make *this* process run without the
    extension (the pure backends: ``sdpa``/``reference``), so a first command does not wait a
    minute or two for the compiler. The next process finds the build in the cache. Returns the
    build log's path. A build already running in the background is not started twice."""
    import subprocess

    folder = cache_dir(cuda_unavailable_reason() is None)
    log = folder / "background-build.log"
    pid_file = folder / "background-build.pid"
    running = False
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
        running = True
    except (OSError, ValueError):
        pass
    if not running:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from musefast import _build; import sys; "
                 "sys.exit(0 if _build.extension() is not None else print(_build._state['error']) or 1)"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        pid_file.write_text(str(proc.pid))
    with _lock:
        _state.update(tried=True, module=None, how=None,
                      error=f"being compiled in the background (first use; log: {log}); this process uses "
                            "the pure PyTorch backends")
    return log


def extension_status() -> dict:
    """What was built, how, and why not; builds the extension if not yet tried."""
    module = extension()
    status = {k: _state[k] for k in ("how", "error", "seconds")}
    status["built"] = module is not None
    if module is not None:
        status.update(module.build_info())
    return status


def aot_extension():
    """setup.py hook for ``MUSEFAST_AOT=1``: (ext_modules, cmdclass) for ``musefast._C``."""
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = cuda_unavailable_reason() is None
    cflags, cuda_flags = _flags(with_cuda, native=os.environ.get("MUSEFAST_NATIVE") == "1")
    rel = [os.path.relpath(s) for s in sources(with_cuda)]
    kind = CUDAExtension if with_cuda else CppExtension
    ext = kind(
        "musefast._C",
        rel,
        include_dirs=[str(csrc_dir())],
        extra_compile_args={"cxx": cflags, "nvcc": cuda_flags} if with_cuda else {"cxx": cflags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}
