"""Reference (definition) of ``rms_norm_modulate``: RMSNorm, then aMUSEd's modulation.

rms_norm(x) · scale + shift over the last dim of x, where rms_norm is torch's (float32 math for
low-precision inputs, one rounding) and scale/shift are per image (B, C) — or a (1, C) scale
shared by every image: a plain RMSNorm's weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_modulate(x: torch.Tensor, eps: float | None, scale: torch.Tensor | None,
                      shift: torch.Tensor | None) -> torch.Tensor:
    """x (B, ..., C); scale (B or 1, C) or None; shift (B, C) or None -> x's shape and dtype."""
    y = F.rms_norm(x, (x.shape[-1],), None, eps)
    shape = (-1,) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    if scale is not None:
        y = y * scale.view(shape)
    return y if shift is None else y + shift.view(shape)
