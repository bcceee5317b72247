"""Rotary position embedding on half-width tables (the fast path of ``musefast.reference.rope``).

The reference multiplies x by full-width cos/sin tables in which every angle appears twice; here
each channel pair reads its angle once ((L, D/2) tables: half the table traffic) and the rotation
is written as the two products of a complex multiplication. Per element the arithmetic is the
reference's (x₀c − x₁s, x₁c + x₀s in float32), so the results are bit-identical — the test
compares them. Positions whose ids are all zero (Meissonic's text tokens) turn by angle 0, an exact
identity: Meissonic's double-stream blocks rotate only the image rows (before joining the text),
its single-stream blocks the joint sequence in one call (:meth:`RopeTables.rows` gives the former).
"""
from __future__ import annotations

import torch

from musefast.reference.rope import rope_angles


class RopeTables:
    """Half-width float32 (cos, sin) tables (L, D/2) of a set of ids."""

    def __init__(self, ids: torch.Tensor, axes_dims, theta: float = 10000.0):
        angles = rope_angles(ids, axes_dims, theta)  # float64, as the peer computes them
        self.cos, self.sin = angles.cos().float(), angles.sin().float()

    def rows(self, start: int) -> "RopeTables":
        """The tables of positions ``start:``."""
        out = object.__new__(RopeTables)
        out.cos, out.sin = self.cos[start:], self.sin[start:]
        return out

    def gather(self, positions: torch.Tensor) -> "RopeTables":
        """Per-image tables (B, 1, M, D/2) of ``positions`` (B, M), broadcasting over heads: the
        rows a step-cache forward computes keep their own positions."""
        out = object.__new__(RopeTables)
        out.cos, out.sin = self.cos[positions][:, None], self.sin[positions][:, None]
        return out

    def __len__(self) -> int:
        return self.cos.shape[-2]


def apply_rope(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """x (..., L, D) -> x with channel pairs rotated by the tables' angles, same dtype."""
    if x.shape[-2] != len(tables) or x.shape[-1] != 2 * tables.cos.shape[-1]:
        raise ValueError(f"x (..., L, D) = {tuple(x.shape)} does not fit rotary tables of "
                         f"{len(tables)} positions x {2 * tables.cos.shape[-1]} channels")
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = tables.cos, tables.sin
    return torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2).to(x.dtype)
