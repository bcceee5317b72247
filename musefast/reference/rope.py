"""Reference (definition) of the rotary position embedding of FLUX-style joint transformers.

Each position has one id per axis (Meissonic: (0, row, col) for an image token, (0, 0, 0) for a
text token). Axis a owns ``axes_dims[a]`` channels of a head; its channel pair (2i, 2i + 1) turns
by the angle ``id_a · θ^(−2i / axes_dims[a])``. As tables over the full head width (each angle
repeated for both channels of its pair)::

    out = x · cos + rotate_pairs(x) · sin,   rotate_pairs(x)[2i] = −x[2i+1], [2i+1] = x[2i]

computed in float32 (float64 angles), returned in x's dtype.
"""
from __future__ import annotations

import torch


def rope_angles(ids: torch.Tensor, axes_dims, theta: float = 10000.0) -> torch.Tensor:
    """ids (L, n_axes) -> float64 angles (L, sum(axes_dims) / 2), one per channel pair."""
    if ids.dim() != 2 or ids.shape[1] != len(axes_dims):
        raise ValueError(f"ids must be (L, {len(axes_dims)}), got {tuple(ids.shape)}")
    parts = []
    for a, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"every rotary axis needs an even number of channels, got axes_dims={tuple(axes_dims)}")
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        parts.append(ids[:, a].to(torch.float64)[:, None] * freqs[None])
    return torch.cat(parts, dim=1)


def rope_tables(ids: torch.Tensor, axes_dims, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width float32 (cos, sin) tables (L, sum(axes_dims)), each angle repeated per pair."""
    angles = rope_angles(ids, axes_dims, theta)
    return (angles.cos().repeat_interleave(2, dim=1).float(), angles.sin().repeat_interleave(2, dim=1).float())


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., L, D) with full-width tables (L, D) -> rotated x, same dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def qk_norm_rope(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """Definition of ``ops.qk_norm_rope`` for one stream: split a fused projection into heads,
    RMS-normalise q and k per head (times their weights), rotate them, and lay q, k, v out for
    attention.

    qkv (B, L, 3·H·D), weights (D,), full-width tables (L, D) -> (3, B, H, L, D) in qkv's dtype:
    q = rope(x / sqrt(mean(x²) + eps) · w), likewise k; v as it is. All math in float32.
    """
    q, k, v = qkv.float().unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()

    q, k = apply_rope(norm(q, q_weight), cos, sin), apply_rope(norm(k, k_weight), cos, sin)
    return torch.stack([q, k, v]).to(qkv.dtype)
