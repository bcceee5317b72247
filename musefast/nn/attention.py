"""Multi-head self- and cross-attention modules over :func:`musefast.ops.attention`.

Weight layout (what converters must produce):
- ``Attention.to_qkv.weight``: (3·H·D, dim), rows ``[q; k; v]``, each head-major (H, D);
- ``CrossAttention.to_q.weight``: (H·D, dim); ``to_kv.weight``: (2·H·D, context_dim), rows
  ``[k; v]``, head-major;
- ``to_out``: (dim, H·D). Optional q/k RMSNorm acts per head over D (weight of size D).
- ``qk_norm="l2"``: q and k are L2-normalised over D, then multiplied by a learned weight of
  size D (muse-maskgit-pytorch's ``q_scale``/``k_scale``); use with a fixed ``scale``.
- ``null_kv``: (2, H, 1, D) learned key/value prepended to every sequence of keys (an always
  attended "null" slot; muse-maskgit-pytorch), before the k norm.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from musefast.nn.row_cache import KVStore, scatter_head_rows_
from musefast.ops.attention import attention


class CrossAttentionKV(NamedTuple):
    """Projected (and k-normed) cross-attention keys and values, each (B, H, Lk, D)."""

    k: torch.Tensor
    v: torch.Tensor


class L2Norm(nn.Module):
    """x / max(‖x‖₂, 1e-12) · weight over the last dim (weight of size ``dim``, init 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.weight


def _make_qk_norm(kind, head_dim: int, eps: float) -> nn.Module | None:
    if kind is False or kind is None:
        return None
    if kind is True or kind == "rmsnorm":
        return nn.RMSNorm(head_dim, eps=eps)
    if kind == "l2":
        return L2Norm(head_dim)
    raise ValueError(f"qk_norm must be False, True/'rmsnorm' or 'l2', got {kind!r}")


class _MultiHead(nn.Module):
    """What self- and cross-attention share: head geometry, q/k norms, null K/V, output projection."""

    def __init__(self, dim, num_heads, head_dim, bias, out_bias, qk_norm, norm_eps, scale, backend, null_kv=False):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.inner_dim = num_heads * head_dim
        self.scale, self.backend = scale, backend
        self.q_norm = _make_qk_norm(qk_norm, head_dim, norm_eps)
        self.k_norm = _make_qk_norm(qk_norm, head_dim, norm_eps)
        self.null_kv = nn.Parameter(torch.randn(2, num_heads, 1, head_dim)) if null_kv else None
        self.to_out = nn.Linear(self.inner_dim, dim, bias=bias if out_bias is None else out_bias)

    def _split_heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, L, parts·H·D) -> ``parts`` views of shape (B, H, L, D)."""
        B, L, _ = x.shape
        return x.view(B, L, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend(self, q, k, v, key_padding_mask):
        """Attention of (B, H, L, D) heads + output projection; k comes already k-normed
        (precomputed cross-attention K/V are stored normed)."""
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.null_kv is not None and key_padding_mask is not None:  # the null slot is always attended
            key_padding_mask = F.pad(key_padding_mask, (1, 0), value=True)
        out = attention(q, k, v, key_padding_mask=key_padding_mask, scale=self.scale, backend=self.backend)
        B, _, L, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, L, self.inner_dim))

    def _with_null(self, k, v):
        """Prepend the learned null key/value (if any) to (B, H, Lk, D) keys and values."""
        if self.null_kv is None:
            return k, v
        nk, nv = (t.to(k.dtype).expand(k.shape[0], -1, -1, -1) for t in self.null_kv)
        return torch.cat([nk, k], dim=2), torch.cat([nv, v], dim=2)

    def _norm_k(self, k):
        return k if self.k_norm is None else self.k_norm(k)


class Attention(_MultiHead):
    """Multi-head self-attention: fused QKV projection, optional q/k RMSNorm, output projection.

    Args:
        dim: model width; num_heads: H; head_dim: D (default dim // H).
        bias: bias of the QKV projection; out_bias: of the output projection (default: bias).
        qk_norm: RMSNorm over D on q and k (per head, eps ``norm_eps``); ``"l2"``: L2 norm
            times a learned weight (see the module docstring).
        null_kv: prepend a learned null key/value to the keys (see the module docstring).
        scale: softmax scale (default 1/sqrt(D)); backend: passed to ``ops.attention``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        out_bias: bool | None = None,
        qk_norm: bool | str = False,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        backend: str | None = None,
        null_kv: bool = False,
    ):
        super().__init__(dim, num_heads, head_dim, bias, out_bias, qk_norm, norm_eps, scale, backend, null_kv)
        self.to_qkv = nn.Linear(dim, 3 * self.inner_dim, bias=bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, *,
                kv_store: KVStore | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim), key_padding_mask (B, L) bool (True = attend) -> (B, L, dim).

        With ``kv_store`` (see :mod:`musefast.nn.row_cache`): ``rows=None`` computes as usual
        and records the K/V; ``rows`` (B, M) means x holds only those rows (B, M, dim) of the
        sequence: their K/V replace the recorded ones and their queries attend to all keys.
        """
        q, k, v = self._split_heads(self.to_qkv(x), 3)
        if rows is None:
            k, v = self._with_null(k, v)
            k = self._norm_k(k)
            if kv_store is not None:  # contiguous copies: a view would keep the whole QKV buffer alive
                kv_store.put(self, "k", k.contiguous())
                kv_store.put(self, "v", v.contiguous())
            return self._attend(q, k, v, key_padding_mask)
        if kv_store is None:
            raise ValueError("rows= needs the kv_store of a full forward")
        key_rows = rows if self.null_kv is None else rows + 1  # the null slot is key 0
        k_all = scatter_head_rows_(kv_store.get(self, "k"), key_rows, self._norm_k(k))
        v_all = scatter_head_rows_(kv_store.get(self, "v"), key_rows, v)
        return self._attend(q, k_all, v_all, key_padding_mask)


class CrossAttention(_MultiHead):
    """Multi-head cross-attention: Q projection of x, fused KV projection of the context.

    The context (text) K/V are constant over all decoding steps: compute them once with
    :meth:`precompute_kv` and pass the result as ``kv=`` at every step.

    Args: as :class:`Attention`, plus ``context_dim`` (default: dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        context_dim: int | None = None,
        bias: bool = False,
        out_bias: bool | None = None,
        qk_norm: bool | str = False,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        backend: str | None = None,
        null_kv: bool = False,
    ):
        super().__init__(dim, num_heads, head_dim, bias, out_bias, qk_norm, norm_eps, scale, backend, null_kv)
        self.context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, self.inner_dim, bias=bias)
        self.to_kv = nn.Linear(self.context_dim, 2 * self.inner_dim, bias=bias)

    def precompute_kv(self, context: torch.Tensor) -> CrossAttentionKV:
        """context (B, Lk, context_dim) -> projected, k-normed K/V, contiguous (B, H, Lk, D)
        (Lk + 1 keys with ``null_kv``: the null slot first)."""
        k, v = self._split_heads(self.to_kv(context), 2)
        k, v = self._with_null(k, v)
        return CrossAttentionKV(self._norm_k(k).contiguous(), v.contiguous())

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        kv: CrossAttentionKV | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Lq, dim) and either context (B, Lk, context_dim) or kv from
        :meth:`precompute_kv`; key_padding_mask (B, Lk) bool (True = attend) -> (B, Lq, dim)."""
        if (context is None) == (kv is None):
            raise ValueError("pass exactly one of context and kv (from precompute_kv)")
        if kv is None:
            kv = self.precompute_kv(context)
        (q,) = self._split_heads(self.to_q(x), 1)
        return self._attend(q, kv.k, kv.v, key_padding_mask)
