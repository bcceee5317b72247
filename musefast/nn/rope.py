"""Rotary position embedding tables on half width (the fast path of ``musefast.reference.rope``).

The reference multiplies x by full-width cos/sin tables in which every angle appears twice; the
fused ``ops.qk_norm_rope`` reads each channel pair's angle once from these (L, D/2) tables (half
the table traffic) and writes the rotation as the two products of a complex multiplication.
Positions whose ids are all zero (Meissonic's text tokens) turn by angle 0 (cos 1, sin 0), an exact
identity, so one set of tables covers the joint [text; image] sequence.
"""
from __future__ import annotations

import torch

from musefast.reference.rope import rope_angles


class RopeTables:
    """Half-width float32 (cos, sin) tables (L, D/2) of a set of ids (per image (B, M, D/2) after
    :meth:`gather`)."""

    def __init__(self, ids: torch.Tensor, axes_dims, theta: float = 10000.0):
        angles = rope_angles(ids, axes_dims, theta)  # float64, as the peer computes them
        self.cos, self.sin = angles.cos().float(), angles.sin().float()

    def gather(self, positions: torch.Tensor) -> "RopeTables":
        """Per-image tables (B, M, D/2) of ``positions`` (B, M): the rows a step-cache forward
        computes keep their own positions."""
        out = object.__new__(RopeTables)
        out.cos, out.sin = self.cos[positions], self.sin[positions]
        return out
