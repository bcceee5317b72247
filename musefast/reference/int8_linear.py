"""Reference (definition) of musefast's int8 linear (``quantize="int8"``), as fake quantization.

Both operands are quantized symmetrically to integers in [-127, 127] (round half to even):

* the weight W (N, K) per output channel: ``s_w[n] = max_k |W[n, k]| / 127``;
* the input x (M, K) per token (row), afresh at every call: ``s_x[m] = max_k |x[m, k]| / 127``;

an all-zero row gets scale 1 (its integers are all 0). The product is the dequantized operands'
``F.linear`` in float32, plus the bias, returned in x's dtype::

    y = (round(x / s_x) · s_x) @ (round(W / s_w) · s_w)ᵀ + b

The fast path (:mod:`musefast.cpu.int8`) multiplies the integers exactly (int32 sums in
oneDNN) and scales afterwards, so it differs from this only by float32 rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QMAX = 127  # symmetric range: -128 is never used, so negating a quantized row stays in range


def symmetric_scale(t: torch.Tensor) -> torch.Tensor:
    """Per-row scale (..., 1) in float32: the row's largest magnitude over 127, or 1 for a zero row."""
    amax = t.detach().abs().amax(dim=-1, keepdim=True).float()
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t (..., K) -> (int8 integers (..., K), float32 scales (..., 1)), per row."""
    scale = symmetric_scale(t)
    q = torch.clamp(torch.round(t.float() / scale), -QMAX, QMAX).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K), weight (N, K), bias (N,) or None -> (..., N) in x's dtype (see module docstring)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {weight.shape[-1]}")
    qx, sx = quantize_rows(x)
    qw, sw = quantize_rows(weight)
    y = F.linear(qx.float() * sx, qw.float() * sw, None if bias is None else bias.float())
    return y.to(x.dtype)
