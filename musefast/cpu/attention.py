"""The ``bmm`` attention backend: CPU attention as two batched matrix products around a softmax.

Cross-attention to the text (256 image tokens attending to 77 text tokens, 12 or 16 heads × 64)
is small: a head's score matrix is 256 × 77, so a blockwise (flash) kernel saves no memory
traffic worth its cost, while batched products over all B·H heads run at full width. Measured on
the 2-core AVX512-BF16 machine (shared, so CPU time at 1 thread, min of 7 rounds): bf16
cross-attention of B=2, 16 heads to 77 keys 2.5 ms vs SDPA's 3.4 ms. Self-attention over 256 keys
is faster in SDPA (see :data:`MAX_KEYS`), and so is everything in float32, where the products go
through MKL rather than oneDNN: the backend declines those (``reasons``) and SDPA runs.

Precision: the scores are formed in float32 from the bf16 inputs (rounded to bf16 they would
miss the agreement rule of musefast.reference.agreement; tests/test_cpu_attention.py shows it),
the softmax runs in float32, and the probabilities are rounded to bf16 for the product with V.
"""
from __future__ import annotations

import torch

from musefast.reference.attention import default_scale

MAX_KEYS = 160
"""Key count up to which ``bmm`` beats SDPA (bf16, B=2, 16 heads × 64, 256 queries; CPU time at 1
thread, min of 7 rounds): 77 keys 2.5 vs 3.4 ms, 128 keys 3.3 vs 4.1, 160 keys 4.0 vs 4.8, 256 keys
13.5 vs 7.2 (likely: the float32 score matrices outgrow the cache)."""


def reasons(q, k, v, key_padding_mask, scale) -> list[str]:
    """Why ``bmm`` cannot (or should not) run these inputs: CPU tensors in bfloat16 with at most
    :data:`MAX_KEYS` keys. In float32 its products go through MKL, and a whole aMUSEd-256 forward
    ran 4 % slower than with SDPA's kernel (CPU time, 1 thread); float16 products are emulated."""
    out = []
    if q.device.type != "cpu":
        out.append(f"bmm runs on CPU tensors, got {q.device.type}")
    if q.dtype != torch.bfloat16:
        out.append(f"bmm takes bfloat16 only (in {q.dtype} SDPA's CPU kernel is as fast or faster)")
    if k.shape[2] > MAX_KEYS:
        out.append(f"bmm runs up to {MAX_KEYS} keys, got {k.shape[2]}: beyond, SDPA's blockwise kernel is faster")
    return out


def bmm_attention(q, k, v, key_padding_mask, scale):
    """softmax(q kᵀ · scale) v over (B, H, L, D) heads, with the key padding mask of ops.attention.

    Returns (B, H, Lq, D), contiguous."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = default_scale(D) if scale is None else scale
    # q and k in float32, made contiguous by that one conversion (the heads of a packed projection
    # come as strided views): rounded to bf16, the scores would be off by up to 2^-9 of their
    # size, which the softmax turns into errors beyond the agreement rule's bound.
    q3, k3 = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (q, k))
    q3, k3, v3 = q3.view(B * H, Lq, D), k3.view(B * H, Lk, D), v.reshape(B * H, Lk, D)
    scores = torch.baddbmm(q3.new_zeros(()).expand(B * H, Lq, Lk), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)
    if key_padding_mask is not None:
        scores.view(B, H, Lq, Lk).masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v3.dtype)
    out = torch.bmm(probs, v3).view(B, H, Lq, D)
    if key_padding_mask is not None:  # every key masked: softmax gave NaN, the definition is 0
        out = out.masked_fill(~key_padding_mask.any(dim=-1)[:, None, None, None], 0)
    return out
