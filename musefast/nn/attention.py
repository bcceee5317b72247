"""Multi-head self- and cross-attention modules over :func:`musefast.ops.attention`.

Weight layout (what converters must produce):
- ``Attention.to_qkv.weight``: (3·H·D, dim), rows ``[q; k; v]``, each head-major (H, D);
- ``CrossAttention.to_q.weight``: (H·D, dim); ``to_kv.weight``: (2·H·D, context_dim), rows
  ``[k; v]``, head-major;
- ``to_out``: (dim, H·D). Optional q/k RMSNorm acts per head over D (weight of size D).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from musefast.ops.attention import attention


class CrossAttentionKV(NamedTuple):
    """Projected (and k-normed) cross-attention keys and values, each (B, H, Lk, D)."""

    k: torch.Tensor
    v: torch.Tensor


class _MultiHead(nn.Module):
    """What self- and cross-attention share: head geometry, q/k norms, output projection."""

    def __init__(self, dim, num_heads, head_dim, bias, out_bias, qk_norm, norm_eps, scale, backend):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim = num_heads, head_dim
        self.inner_dim = num_heads * head_dim
        self.scale, self.backend = scale, backend
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
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
        out = attention(q, k, v, key_padding_mask=key_padding_mask, scale=self.scale, backend=self.backend)
        B, _, L, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, L, self.inner_dim))

    def _norm_k(self, k):
        return k if self.k_norm is None else self.k_norm(k)


class Attention(_MultiHead):
    """Multi-head self-attention: fused QKV projection, optional q/k RMSNorm, output projection.

    Args:
        dim: model width; num_heads: H; head_dim: D (default dim // H).
        bias: bias of the QKV projection; out_bias: of the output projection (default: bias).
        qk_norm: RMSNorm over D on q and k (per head, eps ``norm_eps``).
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
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        backend: str | None = None,
    ):
        super().__init__(dim, num_heads, head_dim, bias, out_bias, qk_norm, norm_eps, scale, backend)
        self.to_qkv = nn.Linear(dim, 3 * self.inner_dim, bias=bias)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim), key_padding_mask (B, L) bool (True = attend) -> (B, L, dim)."""
        q, k, v = self._split_heads(self.to_qkv(x), 3)
        return self._attend(q, self._norm_k(k), v, key_padding_mask)


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
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        backend: str | None = None,
    ):
        super().__init__(dim, num_heads, head_dim, bias, out_bias, qk_norm, norm_eps, scale, backend)
        self.context_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, self.inner_dim, bias=bias)
        self.to_kv = nn.Linear(self.context_dim, 2 * self.inner_dim, bias=bias)

    def precompute_kv(self, context: torch.Tensor) -> CrossAttentionKV:
        """context (B, Lk, context_dim) -> projected, k-normed K/V, contiguous (B, H, Lk, D)."""
        k, v = self._split_heads(self.to_kv(context), 2)
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
