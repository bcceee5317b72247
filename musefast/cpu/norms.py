"""RMSNorm (+ the AdaNorm modulation) in one C++ pass on the CPU, with its reference twin.

``rms_norm_modulate(x, eps, scale, shift)`` = rms_norm(x) · scale + shift, scale/shift (B, C) per
image (or a (1, C) scale shared by all: a plain RMSNorm's weight). torch's CPU ``rms_norm`` is a
composite of about seven passes and allocations (float32 copy, pow, mean, rsqrt, mul, cast,
weight), and the modulation adds one more; ``torch.ops.musefast.rms_norm_modulate``
(csrc/rms_norm.cpp) reads each row twice and writes it once, in float32 with one rounding.

The kernel runs for float32/bfloat16 CPU tensors of shape (B, N, C) outside autograd and
``torch.compile``, when musefast._C builds (just in time, cached, like every compiled op), and not inside :func:`musefast.cpu.linear.plain`;
everything else takes :func:`reference` (the definition: torch's rms_norm, then the modulation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_DTYPES = (torch.float32, torch.bfloat16)


def reference(x: torch.Tensor, eps: float, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """rms_norm(x) · scale + shift over the last dim of x (B, ..., C); scale/shift (B or 1, C)."""
    y = F.rms_norm(x, (x.shape[-1],), None, eps)
    shape = (-1,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    if scale is not None:
        y = y * scale.view(shape)
    return y if shift is None else y + shift.view(shape)


def _kernel_usable(x: torch.Tensor) -> bool:
    from musefast import _build
    from musefast.cpu import linear as cpu

    if torch.compiler.is_compiling() or cpu.plain_active():
        return False
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() != 3 or (torch.is_grad_enabled() and x.requires_grad):
        return False
    # the first call builds musefast._C if needed (cached), as every compiled op does
    return _build.extension() is not None and hasattr(torch.ops.musefast, "rms_norm_modulate")


def rms_norm_modulate(x: torch.Tensor, eps: float, scale: torch.Tensor | None = None,
                      shift: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel where it applies (see the module docstring), else :func:`reference`."""
    if _kernel_usable(x) and all(t is None or t.dtype == x.dtype for t in (scale, shift)):
        eps = torch.finfo(x.dtype).eps if eps is None else eps  # nn.RMSNorm's default, as F.rms_norm
        return torch.ops.musefast.rms_norm_modulate(x, scale, shift, float(eps))
    return reference(x, eps, scale, shift)
