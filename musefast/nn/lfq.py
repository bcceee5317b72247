"""Lookup-free quantization (LFQ, MAGVIT-v2, arXiv 2310.05737): the sibling of the codebook VQ.

The codebook is implicit: {−s, +s}^d with d = log2(K). The nearest code of a vector is its
sign pattern, so encoding is a sign test per channel — no distance computation at all (the
argmin that ``ops.vq_nearest`` would do over the 2^d explicit codes gives the same index,
ties at exactly 0 included, since bit 0 = −s is the lower index). Index bits are
most-significant first: index = Σ_i [x_i > 0] · 2^(d−1−i) (vector-quantize-pytorch's order).
Optional linear projections map the feature width to d and back.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LookupFreeQuantizer(nn.Module):
    """Args:
        dim: feature width of the input and output.
        codebook_size: K, a power of two; d = log2(K) bits per token.
        codebook_scale: s, the code values ±s.
        spherical: codes are L2-normalised to length s (binary spherical quantization).
        has_projections: Linear dim → d before and d → dim after (default: dim != d).
        projection_bias: whether those Linears have a bias.
    """

    def __init__(self, dim: int, codebook_size: int, *, codebook_scale: float = 1.0, spherical: bool = False,
                 has_projections: bool | None = None, projection_bias: bool = True):
        super().__init__()
        bits = math.log2(codebook_size) if codebook_size > 0 else -1
        if bits < 1 or not float(bits).is_integer():
            raise ValueError(f"codebook_size must be a power of two >= 2, got {codebook_size}")
        self.dim, self.codebook_size, self.bits = dim, codebook_size, int(bits)
        self.codebook_scale, self.spherical = float(codebook_scale), spherical
        if has_projections is None:
            has_projections = dim != self.bits
        if not has_projections and dim != self.bits:
            raise ValueError(f"without projections dim must equal log2(codebook_size) = {self.bits}, got {dim}")
        self.project_in = nn.Linear(dim, self.bits, bias=projection_bias) if has_projections else nn.Identity()
        self.project_out = nn.Linear(self.bits, dim, bias=projection_bias) if has_projections else nn.Identity()
        self.register_buffer("bit_values", 2 ** torch.arange(self.bits - 1, -1, -1), persistent=False)

    def _channels_last(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"features must have shape (B, {self.dim}, h, w), got {tuple(z.shape)}")
        return z.permute(0, 2, 3, 1)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Features (B, dim, h, w) -> indices (B, h, w) int64."""
        x = self.project_in(self._channels_last(z))
        return ((x > 0).long() * self.bit_values).sum(-1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) -> quantized features (B, dim, h, w) (codes, projected out)."""
        if indices.dtype not in (torch.int64, torch.int32) or indices.dim() != 3:
            raise TypeError(f"indices must be an int64/int32 tensor (B, h, w), got {indices.dtype} {tuple(indices.shape)}")
        if not torch.compiler.is_compiling() and indices.numel() and (
                int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size})")
        bits = (indices[..., None].long() & self.bit_values) != 0
        dtype = self.project_out.weight.dtype if isinstance(self.project_out, nn.Linear) else torch.float32
        codes = torch.where(bits, self.codebook_scale, -self.codebook_scale).to(dtype)
        if self.spherical:
            codes = F.normalize(codes, dim=-1) * self.codebook_scale
        return self.project_out(codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, dim, h, w) -> (quantized features (B, dim, h, w), indices (B, h, w))."""
        indices = self.encode(z)
        return self.lookup(indices), indices
