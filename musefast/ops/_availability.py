"""Reasons shared by many backends (extension built? triton usable on this device? ...)."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - broken installs
        return f"triton failed to import: {exc}"
    return None


def triton_reasons(*tensors: torch.Tensor, bf16_ok_on_cpu: bool = False) -> list[str]:
    reasons = []
    error = _triton_import_error()
    if error:
        return [error]
    device = tensors[0].device
    if device.type == "cpu":
        if not interpret_mode():
            reasons.append("triton runs CPU tensors only under TRITON_INTERPRET=1 (tests)")
        elif not bf16_ok_on_cpu and any(t.dtype == torch.bfloat16 for t in tensors):
            reasons.append("the Triton interpreter does not support bfloat16")
    elif device.type != "cuda":
        reasons.append(f"triton needs CUDA tensors, got {device.type}")
    return reasons


def extension_reasons(op_name: str, device_type: str) -> list[str]:
    """Reasons the compiled op ``torch.ops.musefast.<op_name>`` cannot run on device_type:
    CPU tensors need the CPU part of musefast._C, CUDA tensors its CUDA part as well."""
    from musefast import _build

    if device_type not in ("cpu", "cuda"):
        return [f"no compiled kernel for {device_type} tensors"]
    if _build.extension() is None:
        return [f"musefast._C is not built ({_build.extension_error()})"]
    if not hasattr(torch.ops.musefast, op_name):
        return [f"musefast._C has no op {op_name}"]
    if device_type == "cuda" and not _build.cuda_extension():
        return [f"CUDA kernels were not compiled ({_build.cuda_extension_error()})"]
    return []


def device_reasons(expected: str, *tensors: torch.Tensor) -> list[str]:
    got = tensors[0].device.type
    return [] if got == expected else [f"needs {expected} tensors, got {got}"]
