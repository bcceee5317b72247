"""``rms_norm_modulate``: RMSNorm with aMUSEd's AdaNorm modulation, y = rms_norm(x) · scale + shift.

scale/shift are (B, C) per image, or a (1, C) scale shared by all images (a plain RMSNorm's
weight). torch's CPU ``rms_norm`` is a composite of about seven passes and allocations (float32
copy, pow, mean, rsqrt, mul, cast, weight) and the modulation adds one more; the ``cpu`` backend
(csrc/rms_norm.cpp) reads each row twice and writes it once, in float32 with one rounding.

Backends, in priority order on CPU tensors: ``cpu`` (musefast._C; float32/bfloat16 (B, N, C),
scale/shift in x's dtype, outside autograd and outside :func:`musefast.cpu.linear.plain`, the CPU
paths' reference twin), ``reference`` (musefast.reference.rms_norm). On other devices the
reference runs. Under ``torch.compile`` the reference is traced: the compiler fuses the norm
itself, and an opaque kernel would only stop it fusing the neighbours.
"""
from __future__ import annotations

import numbers

import torch

from musefast.cpu.linear import plain_active
from musefast.ops import _availability as avail
from musefast.ops.registry import op
from musefast.reference import rms_norm as ref

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _check_inputs(x, eps, scale, shift) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, ..., C), got {tuple(x.shape)}")
    if eps is not None and (not isinstance(eps, numbers.Real) or isinstance(eps, bool) or eps < 0):
        raise ValueError(f"eps must be a number >= 0 or None, got {eps!r}")
    B, C = x.shape[0], x.shape[-1]
    for name, t, rows in (("scale", scale, (B, 1)), ("shift", shift, (B,))):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != C or t.shape[0] not in rows:
            shapes = " or ".join(f"({r}, {C})" for r in rows)
            raise ValueError(f"{name} must have shape {shapes}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: use one device")


# -- backends: each takes (x, eps, scale, shift), inputs already checked -----------------------

def _reference(x, eps, scale, shift):
    return ref.rms_norm_modulate(x, eps, scale, shift)


def _cpu(x, eps, scale, shift):
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # nn.RMSNorm's default, as F.rms_norm
    return torch.ops.musefast.rms_norm_modulate(x, scale, shift, float(eps))


def _cpu_reasons(x, eps, scale, shift):
    reasons = avail.device_reasons("cpu", x)
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(f"the kernel takes float32 or bfloat16, got {x.dtype}")
    if x.dim() != 3:
        reasons.append(f"the kernel takes x of shape (B, N, C), got {tuple(x.shape)}")
    if any(t is not None and t.dtype != x.dtype for t in (scale, shift)):
        reasons.append("the kernel takes scale and shift in x's dtype")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, scale, shift)):
        reasons.append("the kernel has no backward (autograd is recording)")
    if plain_active():
        reasons.append("inside musefast.cpu.linear.plain() (the CPU paths' reference twin)")
    # the extension last: its first use builds musefast._C (cached), as every compiled op does
    return reasons or avail.extension_reasons("rms_norm_modulate", "cpu")


RMS_NORM_MODULATE = op("rms_norm_modulate")
RMS_NORM_MODULATE.register("cpu", _cpu, _cpu_reasons, auto_devices=("cpu",), compiled=True)
RMS_NORM_MODULATE.register("reference", _reference, lambda *args: [])


def _probe(device):
    B, N, C = 2, 3, 8
    return (torch.randn(B, N, C, device=device), 1e-6, torch.ones(B, C, device=device),
            torch.zeros(B, C, device=device)), {}


RMS_NORM_MODULATE.probe = _probe


def rms_norm_modulate(x: torch.Tensor, eps: float | None, scale: torch.Tensor | None = None,
                      shift: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x, then the modulation: rms_norm(x) · scale + shift.

    Args:
        x: (B, ..., C) float32/float16/bfloat16.
        eps: added to the mean square before the reciprocal square root; None = the dtype's
            machine epsilon (``nn.RMSNorm``'s default).
        scale: (B, C) per image, (1, C) for all images (a plain RMSNorm's weight), or None.
        shift: (B, C) or None.
        backend: force a backend (``cpu``, ``reference``); None = the best that can run.

    Returns:
        x's shape and dtype.
    """
    _check_inputs(x, eps, scale, shift)
    if torch.compiler.is_compiling():
        return ref.rms_norm_modulate(x, eps, scale, shift)
    return RMS_NORM_MODULATE(x, eps, scale, shift, backend=backend, device_type=x.device.type)
