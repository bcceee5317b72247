"""Build the C++/CUDA kernels against the torch that runs, as two independent parts.

- ``musefast_C``, the CPU part: the op schemas (``torch.ops.musefast.*``), their CPU and Meta
  kernels and ``build_info()``. Needs only a C++ compiler.
- ``musefast_C_cuda``, the CUDA part: CUDA kernels for the ops the CPU part defines (a plain
  shared library that registers them; no Python module). Compiled only when torch is a CUDA
  build, nvcc is found and (just in time) a GPU is visible, always after the CPU part has loaded.

They are separate so that a CUDA build that fails (an nvcc that does not match torch, a
missing header, ...) never takes the CPU kernels with it: the CPU part still loads, one warning
says what happened, and ``doctor`` says why.

Default: just-in-time on first use with ``torch.utils.cpp_extension.load`` + ninja into a
cache folder (FlashInfer's approach), so ``pip install -e .`` compiles nothing and can never
link against a second torch from an isolated build environment. The CPU part is built when
the extension is first used; the CUDA part when a CUDA tensor first asks for it, or by
``doctor`` -- only where a GPU is visible: the default pip torch is a CUDA build, and on a
machine without a GPU its kernels would cost minutes of nvcc for nothing. While a part
compiles, stderr says what and for how long (:mod:`musefast._build_progress`). Optional
ahead-of-time build of both parts: ``MUSEFAST_AOT=1 pip install -e . --no-build-isolation``
(see setup.py). Failures never break musefast: :func:`extension`
returns ``None``, :func:`cuda_extension` ``False``, and :func:`extension_status` says why.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from musefast import _build_progress

EXTENSION_NAME = "musefast_C"
CUDA_EXTENSION_NAME = "musefast_C_cuda"

# An ahead-of-time build on a machine with no visible GPU gives torch's builder no device to read
# an architecture from (it fails with an IndexError), so the CUDA part is then compiled for these
# unless TORCH_CUDA_ARCH_LIST says otherwise: A100-class and H100-class GPUs as machine code, plus
# PTX of the newest, which the driver compiles for later GPUs. Kept to two: each architecture is a full device compile.
DEFAULT_CUDA_ARCHS = ("8.0", "9.0")

_lock = threading.RLock()
_state: dict = {"tried": False, "module": None, "error": None, "how": None, "seconds": None}
_cuda_state: dict = {"tried": False, "loaded": False, "error": None, "how": None, "seconds": None, "archs": None,
                     "skipped": False}


def csrc_dir() -> Path:
    """The C++/CUDA sources: repo-root csrc/ (source checkout, editable) or the installed copy."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"musefast C++ sources not found next to {here}")


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its "No CUDA runtime is found" warning: a CUDA
    torch with no visible GPU is a case this module handles (DEFAULT_CUDA_ARCHS), not a problem."""
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def nvcc_path() -> str | None:
    """The nvcc torch's builder will run: $CUDA_HOME/bin/nvcc, else the one on PATH."""
    home = _cpp_extension().CUDA_HOME
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


NO_GPU = "no GPU visible"


def gpu_visible() -> bool:
    """A CUDA device this process can use (``CUDA_VISIBLE_DEVICES=""`` hides them all)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def cuda_unavailable_reason(need_gpu: bool = True) -> str | None:
    """Why the CUDA part will not be compiled at all, or None if it will be tried. Just in time
    it is compiled only for a visible GPU (``need_gpu``); an ahead-of-time build, which the user
    asks for explicitly, may target GPUs of another machine."""
    import torch

    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if need_gpu and not gpu_visible():
        return NO_GPU
    if _cpp_extension().CUDA_HOME is None or nvcc_path() is None:
        return "nvcc not found; set CUDA_HOME"
    if not cuda_archs()[0]:
        return f"no default architecture ({', '.join(DEFAULT_CUDA_ARCHS)}) is supported by both torch and nvcc; " \
               "set TORCH_CUDA_ARCH_LIST"
    return None


def sources(with_cuda: bool = False) -> list[str]:
    """The CPU part's sources, or (``with_cuda``) the CUDA part's."""
    root = csrc_dir()
    if not with_cuda:
        return sorted(glob.glob(str(root / "*.cpp")))
    # *.cu are pure CUDA (raw pointers + cudaStream_t); cuda/*.cpp is the thin torch glue
    # that needs torch's CUDA headers, which CPU builds of torch do not ship.
    return sorted(glob.glob(str(root / "cuda" / "*.cu"))) + sorted(glob.glob(str(root / "cuda" / "*.cpp")))


def _flags(native: bool) -> tuple[list[str], list[str]]:
    # -fopenmp at compile time only: at::parallel_for is a header template built on OpenMP
    # pragmas; its GOMP_* symbols then resolve to the libgomp that torch itself loads, so
    # torch.set_num_threads governs our kernels too (no second OpenMP runtime).
    # No -std for the C++ compiler: torch's builder passes the standard its headers are written
    # for (-std=c++20 in 2.13 and 2.14; 2.13's c10/core/AutogradState.h already uses C++20
    # bit-field initialisers), and one of ours would override it.
    cflags = ["-O3", "-ffp-contract=fast", "-fopenmp"]
    if native:  # JIT builds run where they are compiled, so the host's vector units are fair game
        cflags.append("-march=native")
    # nvcc compiles only csrc/cuda/*.cu, which include no torch header: they are
    # written in C++17, the standard scripts/nvcc_compile_check.sh checks them with in CI, so
    # they compile the same whatever standard a torch version prefers.
    cuda_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
    return cflags, cuda_flags


@functools.lru_cache(maxsize=None)
def _nvcc_archs(nvcc: str) -> frozenset[str] | None:
    """The architectures nvcc compiles for ({"8.0", "9.0", ...}), or None if it cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {f"{m[1]}.{m[2]}" for m in re.finditer(r"\bcompute_(\d+)(\d)\b", out)}
    return frozenset(found) or None


def _torch_archs() -> set[str] | None:
    """The GPU architectures this torch build ships kernels for, or None if it cannot say.
    ``torch.cuda.get_arch_list()`` is empty without a visible GPU, so ask the build itself."""
    import torch

    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)()
    found = {f"{m[1]}.{m[2]}" for m in re.finditer(r"\bsm_(\d+)(\d)\b", flags or "")}
    return found or None


def cuda_archs() -> tuple[str, str]:
    """(architecture list in TORCH_CUDA_ARCH_LIST syntax, where it came from) for the CUDA part.
    The list is empty when no default architecture is usable."""
    import torch

    chosen = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if chosen:
        return chosen, "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps), "the visible GPUs"  # torch's builder reads them too
    nvcc = nvcc_path()
    known = [found for found in (_torch_archs(), _nvcc_archs(nvcc) if nvcc else None) if found]
    wanted = [a for a in DEFAULT_CUDA_ARCHS if all(a in found for found in known)]
    if wanted:
        wanted[-1] += "+PTX"
    return ";".join(wanted), "default (no visible GPU)"


def _gencode_flags(arch_list: str) -> list[str]:
    """nvcc flags for "8.0;9.0+PTX". Explicit flags make torch's builder skip its own choice,
    which needs a visible device when TORCH_CUDA_ARCH_LIST is unset."""
    flags = []
    for arch in arch_list.split(";"):
        num = arch.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def arch_names(arch_list: str) -> str:
    """"8.0;9.0+PTX" -> "sm_80, sm_90 + PTX" (names other than numbers are left as they are)."""
    return ", ".join(re.sub(r"^(\d+)\.(\d)", r"sm_\1\2", a).replace("+PTX", " + PTX")
                     for a in re.split(r"[;\s]+", arch_list.strip()))


def cuda_arch_flags() -> list[str]:
    """Arch flags to pass to nvcc: none when torch's builder can choose (TORCH_CUDA_ARCH_LIST
    set, or a visible GPU), the default list otherwise."""
    arch_list, source = cuda_archs()
    return _gencode_flags(arch_list) if source.startswith("default") and arch_list else []


def _host_isa_tag() -> str:
    """Machine + a hash of the CPU's feature flags: JIT builds use -march=native, so a cache
    shared between hosts (an NFS home) must not hand one host's binary to another."""
    import platform

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}-{hashlib.sha1(flags.encode()).hexdigest()[:8]}"


def cache_dir(with_cuda: bool = False) -> Path:
    """The JIT build folder of the CPU part, or (``with_cuda``) of the CUDA part, whose key also
    holds the CUDA version and the architecture list."""
    import torch

    base = Path(os.environ.get("MUSEFAST_CACHE", Path.home() / ".cache" / "musefast"))
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{_host_isa_tag()}"
    if with_cuda:
        tag += f"-cu{torch.version.cuda}-sm" + re.sub(r"[^0-9A-Za-z.]+", "_", cuda_archs()[0].replace("+PTX", "ptx"))
    else:
        tag += "-cpu"
    path = base / "ext" / tag.replace("+", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Up to torch 2.13 the JIT loader serialises builds with a ``lock`` file in the build folder and
# waits for it to disappear; a build killed half-way (Ctrl-C, OOM, a killed job) leaves it behind
# and every later import would wait forever. No build of this extension takes anywhere near this
# long. torch 2.14 holds an OS advisory lock on that file instead (the kernel drops it when the
# holder dies, and the file stays): there an old file means nothing and must not be removed, as
# deleting it under a running build would let a second build start beside it.
STALE_LOCK_SECONDS = 20 * 60


def _torch_waits_for_lock_file() -> bool:
    """True when torch's JIT loader treats the mere existence of ``lock`` as "build running"."""
    cpp_extension = _cpp_extension()
    return hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")


def clear_stale_build_lock(build_dir: Path, max_age_s: float = STALE_LOCK_SECONDS,
                           existence_lock: bool | None = None) -> bool:
    """Remove ``build_dir/lock`` when it is older than ``max_age_s`` and torch waits for such a
    file to disappear (``existence_lock``, default: ask torch); True if removed."""
    if existence_lock is None:
        existence_lock = _torch_waits_for_lock_file()
    lock = Path(build_dir) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if not existence_lock or age < max_age_s:
        return False
    warnings.warn(f"removing a stale extension build lock ({lock}, {age / 60:.0f} min old) left by an "
                  "interrupted build", RuntimeWarning, stacklevel=2)
    lock.unlink(missing_ok=True)
    return True


def _summary(exc: BaseException) -> str:
    """One line for an exception: the compiler's first error line when it has one (the last
    line of a failed build is only ninja's "build stopped")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines[1:] if re.search(r"\b(error|fatal)\b", line, re.IGNORECASE)
              and not line.startswith(("[", "FAILED"))]  # ninja's step and command lines
    line = errors[0] if errors else (lines[-1] if lines else "")
    return f"{type(exc).__name__}: {line[:300]}" if line else type(exc).__name__


def _nvcc_toolkit_root(nvcc: str) -> str | None:
    """The CUDA toolkit nvcc really belongs to (nvcc's own TOP), for nvcc wrapper scripts."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return str(Path(found[1].strip()).resolve()) if found else None


def _usable_cuda_home() -> str | None:
    """torch guesses CUDA_HOME as the folder above the first nvcc on PATH; when that nvcc is a
    wrapper script (/usr/local/bin/nvcc), the guess has no CUDA headers or libraries. Then use
    the toolkit nvcc itself reports. None: keep torch's (it is fine, or CUDA_HOME was set)."""
    home = _cpp_extension().CUDA_HOME
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or home is None:
        return None
    if Path(home, "include", "cuda_runtime_api.h").is_file():
        return None
    root = _nvcc_toolkit_root(nvcc_path() or "nvcc")
    return root if root and Path(root, "include", "cuda_runtime_api.h").is_file() else None


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _inputs(with_cuda: bool) -> list[str]:
    """The files a part's JIT build depends on (its sources and the headers they include)."""
    headers = sorted(glob.glob(str(csrc_dir() / "*.h")))
    if with_cuda:
        headers += sorted(glob.glob(str(csrc_dir() / "cuda" / "*.h")))
    return sources(with_cuda) + headers


def _why_compile(folder: Path, library: Path, with_cuda: bool) -> tuple[bool, str]:
    """(a compile is expected, the reason the start line gives) for a JIT build into ``folder``.
    Not expected: the library is newer than its sources, and loading it takes a second -- unless
    torch finds other work (changed flags), which the progress lines then report late."""
    log = _background_build_log()
    if log is not None and not with_cuda:
        return True, f"waiting for the build another musefast process started; its log: {log}"
    built = _mtime_ns(library)
    if built is None:
        return True, f"first use, cached in {folder}"
    if any((_mtime_ns(Path(p)) or 0) > built for p in _inputs(with_cuda)):
        return True, f"the sources changed, cached in {folder}"
    return False, f"cached in {folder}"


@contextlib.contextmanager
def _reported_jit_build(what: str, folder: Path, name: str, with_cuda: bool):
    """Run a JIT build inside, with its progress on stderr; the yielded dict's "how" then says
    whether it compiled or loaded what the cache held."""
    library = folder / f"{name}.so"
    before = _mtime_ns(library)
    expect, why = _why_compile(folder, library, with_cuda)
    outcome: dict = {}
    with _build_progress.reporting(what, why, expect_compile=expect, describe_error=_summary):
        yield outcome
    compiled = _mtime_ns(library) != before
    outcome["how"] = (f"just-in-time (compiled now; cached in {folder})" if compiled
                      else f"just-in-time (loaded from the cache in {folder})")


def _jit_build():
    load = _cpp_extension().load
    cflags, _ = _flags(native=True)
    clear_stale_build_lock(cache_dir())
    return load(
        name=EXTENSION_NAME,
        sources=sources(),
        extra_cflags=cflags,
        extra_include_paths=[str(csrc_dir())],
        build_directory=str(cache_dir()),
        with_cuda=False,
        verbose=os.environ.get("MUSEFAST_VERBOSE_BUILD") == "1",
    )


def _jit_build_cuda() -> None:
    cpp_extension = _cpp_extension()
    cflags, cuda_flags = _flags(native=True)
    folder = cache_dir(with_cuda=True)
    clear_stale_build_lock(folder)
    home, fixed_home = cpp_extension.CUDA_HOME, _usable_cuda_home()
    if fixed_home:  # torch's builder reads this module global for include and library paths
        cpp_extension.CUDA_HOME = fixed_home
    try:
        cpp_extension.load(
            name=CUDA_EXTENSION_NAME,
            sources=sources(with_cuda=True),
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags + cuda_arch_flags(),
            extra_include_paths=[str(csrc_dir())],
            build_directory=str(folder),
            with_cuda=True,
            is_python_module=False,  # loaded with torch.ops.load_library: it only registers kernels
            verbose=os.environ.get("MUSEFAST_VERBOSE_BUILD") == "1",
        )
    finally:
        cpp_extension.CUDA_HOME = home


def extension():
    """The CPU part (ops registered under ``torch.ops.musefast``, with CPU kernels), or None."""
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
                with _reported_jit_build("the C++ CPU kernels", cache_dir(), EXTENSION_NAME, False) as outcome:
                    module = _jit_build()
                _state["how"] = outcome["how"]
            except Exception as exc:  # a failed build must never break the pure backends
                _state["error"] = _summary(exc)
                return None
        _state["module"], _state["seconds"] = module, time.perf_counter() - start
        return module


def _aot_cuda_library() -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("musefast._C_cuda")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _failure_record(folder: Path) -> Path:
    return folder / "build-failed.json"


def _cuda_fingerprint() -> str:
    """Sources, flags and torch of a CUDA build: a recorded failure stands until one changes."""
    import torch

    digest = hashlib.sha1(repr((torch.__version__, _flags(True), cuda_arch_flags(), cuda_archs())).encode())
    for path in sources(with_cuda=True) + sorted(glob.glob(str(csrc_dir() / "cuda" / "*.h"))):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _warn_cuda_build_failed() -> None:
    warnings.warn(f"musefast: the CUDA kernels could not be built ({_cuda_state['error']}); the CPU kernels are "
                  "unaffected, CUDA tensors use the Triton/PyTorch backends. `musefast doctor` says more.",
                  RuntimeWarning, stacklevel=3)


def cuda_extension() -> bool:
    """True when the CUDA kernels are loaded (building them first if needed). The CPU part is
    loaded first: it defines the ops the CUDA part implements."""
    with _lock:
        if _cuda_state["tried"]:
            return _cuda_state["loaded"]
        _cuda_state["tried"] = True
        if extension() is None:
            _cuda_state["error"] = "the CPU part of musefast._C, which defines the ops, is not built"
            return False
        aot = _aot_cuda_library()
        reason = None if aot else cuda_unavailable_reason()
        if reason:  # nothing to compile for, or with: not a failure
            _cuda_state["error"], _cuda_state["skipped"] = reason, True
            return False
        import torch

        start = time.perf_counter()
        if aot:
            try:
                torch.ops.load_library(aot)
            except Exception as exc:
                _cuda_state["error"] = f"ahead-of-time musefast._C_cuda does not load: {_summary(exc)}"
                return False
            _cuda_state["how"] = "ahead-of-time (musefast._C_cuda)"
        else:
            _cuda_state["archs"] = cuda_archs()[0]
            record, fingerprint = _failure_record(cache_dir(with_cuda=True)), _cuda_fingerprint()
            try:
                earlier = json.loads(record.read_text())
            except (OSError, ValueError):
                earlier = {}
            if earlier.get("fingerprint") == fingerprint:
                _cuda_state["error"] = f"{earlier['error']} (an earlier build failed; full log: {record}; " \
                                       "delete it to retry)"
                _warn_cuda_build_failed()  # a GPU is losing its kernels: say so in every process
                return False
            try:
                with _reported_jit_build(f"the CUDA kernels for {arch_names(_cuda_state['archs'])}",
                                         cache_dir(with_cuda=True), CUDA_EXTENSION_NAME, True) as outcome:
                    _jit_build_cuda()
            except Exception as exc:  # the CPU part stays loaded whatever happens here
                _cuda_state["error"] = _summary(exc)
                record.write_text(json.dumps({"fingerprint": fingerprint, "error": _cuda_state["error"],
                                              "log": str(exc)}, indent=1))
                _warn_cuda_build_failed()
                return False
            _cuda_state["how"] = outcome["how"]
        _cuda_state["loaded"], _cuda_state["seconds"] = True, time.perf_counter() - start
        return True


def extension_error() -> str | None:
    """Why the CPU part is not loaded (after :func:`extension` was tried)."""
    return _state["error"]


def cuda_extension_error() -> str | None:
    """Why the CUDA part is not loaded (after :func:`cuda_extension` was tried)."""
    return _cuda_state["error"]


def _aot_module_present() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("musefast._C") is not None
    except (ImportError, ValueError):
        return False


def _cuda_needed_now() -> bool:
    """The CUDA part matters to a command only when there is a GPU to run it on."""
    return cuda_unavailable_reason() is None


def needs_first_build() -> bool:
    """True when using the extension now would compile something first: the CPU part, or the
    CUDA part on a machine with a GPU (nothing ahead-of-time, nothing in the JIT cache for
    this torch/host, no recorded failure, not disabled, not tried yet)."""
    if _state["tried"] or os.environ.get("MUSEFAST_NO_EXT") == "1" or _aot_module_present():
        return False
    if not (cache_dir() / f"{EXTENSION_NAME}.so").is_file():
        return True
    if _cuda_state["tried"] or not _cuda_needed_now() or _aot_cuda_library():
        return False
    folder = cache_dir(with_cuda=True)
    return not (folder / f"{CUDA_EXTENSION_NAME}.so").is_file() and not _failure_record(folder).is_file()


def build_now() -> bool:
    """Build (or load) every part this machine can use now: the CPU part, and the CUDA part
    where a GPU is visible. True when the CPU part loaded."""
    module = extension()
    if _cuda_needed_now():
        cuda_extension()
    return module is not None


def _background_files() -> tuple[Path, Path]:
    folder = cache_dir()
    return folder / "background-build.log", folder / "background-build.pid"


def _background_build_log() -> Path | None:
    """The log of a background build that another process is running now, if there is one."""
    log, pid_file = _background_files()
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return log if pid != os.getpid() else None  # the background build itself is not waiting


def build_in_background() -> Path:
    """Start the first JIT build in a detached process and make *this* process run without the
    extension (the pure backends: ``sdpa``/``reference``), so a first command does not wait
    minutes for the compiler. The next process finds the build in the cache. Returns the build
    log's path, where the build's progress lines go. A build already running in the background
    is not started twice."""
    log, pid_file = _background_files()
    if _background_build_log() is None:
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from musefast import _build; import sys; m = _build.extension(); "
                 "_build._cuda_needed_now() and _build.cuda_extension(); "
                 "sys.exit(0 if m is not None else print(_build._state['error']) or 1)"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        pid_file.write_text(str(proc.pid))
    why = (f"being compiled in the background (first use; log: {log}); this process uses "
           "the pure PyTorch backends")
    with _lock:
        _state.update(tried=True, module=None, how=None, error=why)
        if _cuda_needed_now():
            _cuda_state.update(tried=True, loaded=False, how=None, error=why)
    return log


def extension_status() -> dict:
    """What was built, how, and why not, for both parts; builds them if not yet tried."""
    module = extension()
    cuda_loaded = cuda_extension()
    status = {k: _state[k] for k in ("how", "error", "seconds")}
    status["built"] = module is not None
    if module is not None:
        status.update(module.build_info())
    status["cuda_kernels"] = cuda_loaded
    status.update({f"cuda_{k}": _cuda_state[k] for k in ("how", "error", "seconds", "archs")})
    status["cuda_skipped"] = bool(_cuda_state.get("skipped"))
    return status


def _aot_build_ext():
    """setup.py's build_ext for ``MUSEFAST_AOT=1``: a CUDA part that fails to compile is left
    out with a message (the JIT path then tries it and reports why); the CPU part is kept."""
    from torch.utils.cpp_extension import BuildExtension

    class MusefastBuildExtension(BuildExtension):
        def build_extensions(self):
            self.musefast_failed = []
            super().build_extensions()
            # what failed is not installed (an in-place or editable install copies every extension)
            self.extensions = [ext for ext in self.extensions if ext.name not in self.musefast_failed]

        def build_extension(self, ext):
            if not ext.name.endswith("_C_cuda"):
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as exc:
                self.musefast_failed.append(ext.name)
                print(f"musefast: CUDA kernels not built ahead of time ({_summary(exc)}); installing the "
                      "CPU kernels only", file=sys.stderr)

    return MusefastBuildExtension.with_options(use_ninja=True)


def aot_extension():
    """setup.py hook for ``MUSEFAST_AOT=1``: (ext_modules, cmdclass) for ``musefast._C`` and,
    with a CUDA torch and nvcc, ``musefast._C_cuda``."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cflags, cuda_flags = _flags(native=os.environ.get("MUSEFAST_NATIVE") == "1")
    include = [str(csrc_dir())]
    exts = [CppExtension("musefast._C", [os.path.relpath(s) for s in sources()], include_dirs=include,
                         extra_compile_args={"cxx": cflags})]
    reason = cuda_unavailable_reason(need_gpu=False)
    if reason is None:
        fixed_home = _usable_cuda_home()
        if fixed_home:  # this process only builds: torch's builder may keep the corrected path
            _cpp_extension().CUDA_HOME = fixed_home
        exts.append(CUDAExtension("musefast._C_cuda", [os.path.relpath(s) for s in sources(with_cuda=True)],
                                  include_dirs=include,
                                  extra_compile_args={"cxx": cflags, "nvcc": cuda_flags + cuda_arch_flags()}))
    else:
        print(f"musefast: CUDA kernels not built ahead of time: {reason}", file=sys.stderr)
    return exts, {"build_ext": _aot_build_ext()}
