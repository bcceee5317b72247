"""Reference (definition) of codebook nearest-neighbour quantization.

Squared Euclidean distance, argmin, lowest index on ties. Computed in float64 from the
inputs' exact values, in row chunks so that no N×K matrix larger than a chunk exists: the
result is the definition, not an approximation of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 24  # rows × codes per chunk (128 MiB of float64)


def vq_nearest_l2(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, D), codebook (K, D) -> (indices (N,) int64, squared distances (N,) float32)."""
    cb = codebook.double()
    cb_sqnorm = cb.pow(2).sum(1)
    rows = max(1, _CHUNK_ELEMENTS // max(1, cb.shape[0]))
    indices, distances = [], []
    for chunk in z.double().split(rows):
        # ||z||² - 2 z·c + ||c||², exact enough in float64 that ties stay ties and the
        # order of distinct float32 distances is preserved.
        dist = chunk.pow(2).sum(1, keepdim=True) - 2.0 * chunk @ cb.T + cb_sqnorm
        best, idx = dist.min(dim=1)  # first index among equal minima
        indices.append(idx)
        distances.append(best.clamp_min(0.0).float())
    if not indices:
        return z.new_empty(0, dtype=torch.long), z.new_empty(0, dtype=torch.float32)
    return torch.cat(indices), torch.cat(distances)


def normalize_for_cosine(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise the last dim (in fp32): nearest in L2 = highest cosine similarity."""
    return F.normalize(x.float(), dim=-1)


def vq_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """indices (...) int -> vectors (..., D)."""
    return F.embedding(indices, codebook)
