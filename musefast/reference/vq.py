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
        # ||z||² - 2 z·c + ||c||² in float64 ranks distinct float32 distances correctly, but a
        # GEMM may round identical codes differently; so the near-minimal candidates are
        # re-scored exactly, elementwise, and the lowest index among the exact minima wins.
        znorm = chunk.pow(2).sum(1, keepdim=True)
        dist = znorm - 2.0 * chunk @ cb.T + cb_sqnorm
        tol = 1e-9 * (znorm + cb_sqnorm.max())
        rows_i, codes_i = torch.nonzero(dist <= dist.min(dim=1, keepdim=True).values + tol, as_tuple=True)
        exact = (chunk[rows_i] - cb[codes_i]).pow(2).sum(1)
        best = torch.full((chunk.shape[0],), float("inf"), dtype=torch.float64, device=z.device)
        best = best.scatter_reduce(0, rows_i, exact, reduce="amin")
        winner = torch.full((chunk.shape[0],), cb.shape[0], dtype=torch.long, device=z.device)
        is_min = exact == best[rows_i]
        winner = winner.scatter_reduce(0, rows_i[is_min], codes_i[is_min], reduce="amin")
        no_candidate = winner == cb.shape[0]  # a row with NaNs: index 0, distance NaN
        indices.append(winner.masked_fill(no_candidate, 0))
        distances.append(best.masked_fill(no_candidate, float("nan")).float())
    if not indices:
        return z.new_empty(0, dtype=torch.long), z.new_empty(0, dtype=torch.float32)
    return torch.cat(indices), torch.cat(distances)


def normalize_for_cosine(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise the last dim (in fp32): nearest in L2 = highest cosine similarity."""
    return F.normalize(x.float(), dim=-1)


def vq_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """indices (...) int -> vectors (..., D)."""
    return F.embedding(indices, codebook)
