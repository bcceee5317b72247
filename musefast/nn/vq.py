"""``VectorQuantizer``: a thin module over ``ops.vq_nearest`` / ``ops.vq_lookup``."""
from __future__ import annotations

import torch
from torch import nn

from musefast import ops


class VectorQuantizer(nn.Module):
    """Codebook quantizer of VQGAN feature maps.

    Its state_dict is ``{"embedding.weight": (codebook_size, dim)}``, the layout of diffusers'
    ``VectorQuantizer`` (and taming-transformers'), so their codebooks load unchanged.

    Args:
        codebook_size: number of entries K.
        dim: vector size D (the channel count of the feature map).
        metric: ``"l2"`` or ``"cosine"`` (unit-normalised codes and features).
        beta: commitment-loss weight used by :meth:`forward` when training.
        backend: force a vq_nearest backend (None = best available).
    """

    def __init__(self, codebook_size: int, dim: int, *, metric: str = "l2", beta: float = 0.25,
                 backend: str | None = None):
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ValueError(f"codebook_size and dim must be >= 1, got {codebook_size}, {dim}")
        self.codebook_size, self.dim, self.metric, self.beta, self.backend = codebook_size, dim, metric, beta, backend
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    @property
    def codebook(self) -> torch.Tensor:
        return self.embedding.weight

    def _features_last(self, z: torch.Tensor, channels_last: bool) -> torch.Tensor:
        if z.dim() != 4:
            raise ValueError(f"z must be a 4-D feature map (B, C, H, W) or (B, H, W, C), got shape {tuple(z.shape)}")
        zl = z if channels_last else z.permute(0, 2, 3, 1)
        if zl.shape[-1] != self.dim:
            layout = "(B, H, W, C)" if channels_last else "(B, C, H, W)"
            raise ValueError(f"z has {zl.shape[-1]} channels in layout {layout}, the codebook has dim {self.dim}")
        return zl

    @torch.no_grad()
    def encode(self, z: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
        """Feature map -> indices (B, H, W) int64."""
        zl = self._features_last(z, channels_last)
        return ops.vq_nearest(zl, self.codebook, metric=self.metric, backend=self.backend)

    def lookup(self, indices: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
        """Indices (B, H, W) -> vectors (B, C, H, W) (or (B, H, W, C) with channels_last)."""
        codes = self.codebook
        if self.metric == "cosine":
            codes = nn.functional.normalize(codes, dim=-1)
        vectors = ops.vq_lookup(indices, codes)
        if channels_last or vectors.dim() != 4:
            return vectors
        return vectors.permute(0, 3, 1, 2).contiguous()

    def quantize(self, z: torch.Tensor, *, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map -> (z_q in the same layout, indices (B, H, W))."""
        indices = self.encode(z, channels_last=channels_last)
        return self.lookup(indices, channels_last=channels_last).to(z.dtype), indices

    def forward(self, z: torch.Tensor, *, channels_last: bool = False):
        """(z_q with a straight-through gradient, indices, commitment + codebook loss)."""
        z_q, indices = self.quantize(z, channels_last=channels_last)
        zf = nn.functional.normalize(z, dim=-1 if channels_last else 1) if self.metric == "cosine" else z
        loss = self.beta * (z_q.detach() - zf).pow(2).mean() + (z_q - zf.detach()).pow(2).mean()
        return zf + (z_q - zf).detach(), indices, loss

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, metric={self.metric!r}"
