"""The per-device verdicts of the self-check: which compiled backend has earned trust where.

A verdict says whether a compiled backend (``compiled=True`` in the registry) agreed with the
reference on small awkward inputs on one device. Verdicts are cached in
``<musefast cache>/selfcheck.json`` keyed by (op, backend, device name/arch or host ISA, torch,
triton and musefast versions, a hash of the kernel sources), so a check runs once per device and
build. ``MUSEFAST_SELFCHECK=0`` skips the checks.

The registry reads verdicts here before it auto-selects a compiled backend; the checks themselves
(inputs, comparisons) are :mod:`musefast.ops.selfcheck`'s and reach this store only through an
op's ``check`` attribute, so neither the registry nor this store imports an op.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import time
import warnings
from pathlib import Path

import torch

_lock = threading.RLock()
_verdicts: dict | None = None  # key -> {"ok": bool, "why": str, "seconds": float}


def enabled() -> bool:
    return os.environ.get("MUSEFAST_SELFCHECK", "1") != "0"


def verdict_file() -> Path:
    base = Path(os.environ.get("MUSEFAST_CACHE", Path.home() / ".cache" / "musefast"))
    return base / "selfcheck.json"


def device_key(device: torch.device) -> str:
    """Device name/arch (CUDA) or host ISA (CPU). Memoised: it is looked up on every call of an
    auto-selected compiled backend, and the CPU tag reads /proc/cpuinfo."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _device_key(device.type, index)


@functools.lru_cache(maxsize=None)
def _device_key(device_type: str, index: int | None) -> str:
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    from musefast import _build

    return f"{device_type}:{_build._host_isa_tag()}"


@functools.lru_cache(maxsize=None)
def _software_key() -> str:
    """torch/triton/musefast versions + a hash of every kernel source (a rebuilt kernel is a new
    backend as far as trust goes)."""
    import importlib.util

    from musefast import __version__, _build

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    digest = hashlib.sha1()
    roots = []
    try:
        roots.append(_build.csrc_dir())
    except FileNotFoundError:
        pass
    spec = importlib.util.find_spec("musefast.kernels")
    roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh", ".py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return f"torch{torch.__version__}/triton{triton_version}/musefast{__version__}/src{digest.hexdigest()[:10]}"


def _key(op_name: str, backend: str, device: torch.device) -> str:
    return f"{op_name}|{backend}|{device_key(device)}|{_software_key()}"


def _load() -> dict:
    global _verdicts
    if _verdicts is None:
        try:
            _verdicts = json.loads(verdict_file().read_text())
        except (OSError, ValueError):
            _verdicts = {}
    return _verdicts


def _store(key: str, verdict: dict) -> None:
    _load()[key] = verdict
    path = verdict_file()
    try:  # merge with what other processes wrote meanwhile; write atomically
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            on_disk = json.loads(path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        on_disk[key] = verdict
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(on_disk, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-check in the next process


def forget() -> None:
    """Drop the in-memory verdicts (tests; the file is re-read on next use)."""
    global _verdicts
    with _lock:
        _verdicts = None


def recorded_failure(the_op, backend: str, device: torch.device) -> list[str]:
    """The reason a failed verdict on record gives (no check is run here)."""
    if not enabled():
        return []
    with _lock:
        verdict = _load().get(_key(the_op.name, backend, device))
    if verdict and not verdict["ok"]:
        return [f"failed the self-check on this device ({verdict['why']}); `musefast doctor --selftest` re-runs it"]
    return []


def trust_reasons(the_op, backend: str, device: torch.device) -> list[str]:
    """[] if the backend has earned trust on ``device`` (checking it now if never checked)."""
    if not enabled() or the_op.check is None:
        return []
    with _lock:
        verdict = _load().get(_key(the_op.name, backend, device))
        if verdict is None:
            verdict = run_check(the_op, backend, device)
    return [] if verdict["ok"] else recorded_failure(the_op, backend, device)


def run_check(the_op, backend: str, device: torch.device) -> dict:
    """Run the op's check for ``backend`` on ``device`` now, record and return the verdict."""
    start = time.process_time()  # CPU time: what the check costs, not what other processes do
    key = _key(the_op.name, backend, device)
    with _lock:
        _load().pop(key, None)  # a failed verdict on record would make the backend refuse to run
        try:
            why = the_op.check(backend, device)
        except BackendCrashed as exc:  # a crashing kernel has not earned trust either
            why = str(exc)
        # any other exception is a bug of the check itself: it propagates and records nothing
        verdict = {"ok": why is None, "why": why or "", "seconds": round(time.process_time() - start, 3)}
        _store(key, verdict)
    if why is not None:
        warnings.warn(
            f"musefast: backend {backend!r} of {the_op.name} disagrees with the reference on this device "
            f"({why}); it is disabled here and the next backend runs (see `musefast doctor`)",
            RuntimeWarning, stacklevel=4)
    return verdict


class BackendCrashed(Exception):
    """The backend raised on a check input (the reference did not): it has not earned trust."""
