"""Self-attention K/V kept from a full forward, for forwards that compute only some rows.

The step cache (``musefast.sampling.cache``) alternates full forwards with cheap
ones. A full forward runs every token and each self-attention layer records its keys and
values here (one (K, V) pair per layer: the store never grows with the number of steps). A
cheap forward runs the per-token work (norms, projections, MLP, head) for a subset of rows
only: each layer writes the new K/V of those rows into its record and attends their queries
against the whole record — ``ops.attention`` with Lq (rows) != Lk (all tokens). The models
pass the store and the rows down (``kv_store=``, ``rows=``); nothing else changes.

``rows`` is a (B, M) int64 tensor of positions, padded per image by repeating one of that
image's own positions (:func:`rows_from_mask`), so a padded row writes the same K/V twice and
its output is dropped — never a position of another image.
"""
from __future__ import annotations

import torch


def rows_from_mask(selected: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (B, M) int64 positions, M = the largest count of selected positions.

    Each image's selected positions come first in ascending order; the rest of its row is
    filled with its first selected position (position 0 when it selects none).
    """
    if selected.dtype != torch.bool or selected.dim() != 2:
        raise ValueError(f"selected must be a (B, N) bool tensor, got {selected.dtype} {tuple(selected.shape)}")
    counts = selected.sum(dim=1)
    M = max(int(counts.max()), 1) if selected.shape[1] else 0
    order = torch.sort((~selected).to(torch.int8), dim=1, stable=True).indices[:, :M]
    pad = torch.arange(M, device=selected.device)[None, :] >= counts[:, None]
    return torch.where(pad, order[:, :1], order)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), rows (B, M) -> (B, M, C)."""
    return x.gather(1, rows[:, :, None].expand(-1, -1, x.shape[-1]))


def scatter_rows_(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) <- values (B, M, C) at rows (B, M), in place; returns x."""
    return x.scatter_(1, rows[:, :, None].expand(-1, -1, x.shape[-1]), values)


def scatter_head_rows_(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, D) <- values (B, H, M, D) at key positions rows (B, M), in place; returns x."""
    B, H, M, D = values.shape
    return x.scatter_(2, rows[:, None, :, None].expand(B, H, M, D), values)


class KVStore:
    """Per-layer self-attention K/V of the last full forward (each (B, H, Lk, D)), plus any
    per-model state a cheap forward needs (e.g. a U-ViT's hidden states), keyed by module.

    ``batch(sl)`` is a view of the same records restricted to a slice of the batch (the
    conditional half of a CFG batch): writes through the view land in this store.
    """

    def __init__(self, records: dict | None = None):
        self._records: dict = {} if records is None else records

    def put(self, owner: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        self._records[(id(owner), name)] = tensor

    def get(self, owner: torch.nn.Module, name: str) -> torch.Tensor:
        try:
            return self._records[(id(owner), name)]
        except KeyError:
            raise RuntimeError(f"no cached {name!r} for {type(owner).__name__}: a cheap forward needs a full "
                               "forward with the same store first") from None

    def batch(self, sl: slice) -> "KVStore":
        return KVStore({key: t[sl] for key, t in self._records.items()})

    @property
    def batch_size(self) -> int | None:
        return next((t.shape[0] for t in self._records.values()), None)

    def nbytes(self, name: str | None = None) -> int:
        """Bytes held (of records called ``name`` only, if given); views count their own extent."""
        return sum(t.numel() * t.element_size() for (_, n), t in self._records.items() if name in (None, n))

    def clear(self) -> None:
        self._records.clear()
