"""Reference (definition) of bidirectional attention with a key padding mask.

softmax(q kᵀ · scale + bias) v, where bias is 0 for attended keys and −∞ for padded ones,
computed with at least float32 accumulation. A query whose keys are all masked has nothing
to attend to: its output is defined as zeros (plain softmax would give NaN).
"""
from __future__ import annotations

import math

import torch


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D), key_padding_mask (B, Lk) bool (True = attend).

    Returns (B, H, Lq, D) in q's dtype. float64 inputs are computed in float64, anything
    narrower in float32.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.to(compute))
    if key_padding_mask is not None:
        # all keys masked: softmax gave NaN; the definition is zeros
        has_keys = key_padding_mask.any(dim=-1)[:, None, None, None]
        out = torch.where(has_keys, out, torch.zeros((), dtype=compute, device=out.device))
    return out.to(q.dtype)
