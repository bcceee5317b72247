"""The ``bmm`` attention backend: CPU attention as two batched matrix products around a softmax.

At aMUSEd's sizes (16 heads × 64, 256 image tokens attending to themselves or to 77 text tokens)
a head's whole score matrix is small (256 × 256), so a blockwise (flash) kernel saves no memory
traffic worth its cost, while one oneDNN batched product over all B·H heads runs bf16 at full
width. Measured on the 2-core AVX512-BF16 machine (shared, so CPU time at 1 thread, min of 5
rounds): one head-batch of bf16 self-attention (B=2, L=256) 3.3 ms vs SDPA's 7.2 ms,
cross-attention to 77 keys 1.9 vs 3.2 ms; the whole bf16 aMUSEd-256 forward 1185 vs 1315 ms.
In float32 the products go through MKL rather than oneDNN and SDPA stays ahead (see
``reasons``), so the backend takes bfloat16 only.

Precision: the scores are formed in bf16, as PyTorch's plain attention in that dtype does (the
yardstick of the flash-attn rule, DESIGN §6); the scale is applied inside the product and the
softmax accumulates in float32 inside torch's kernel.
"""
from __future__ import annotations

import torch

from musefast.reference.attention import default_scale


def reasons(q, k, v, key_padding_mask, scale) -> list[str]:
    """Why ``bmm`` cannot (or should not) run these inputs: CPU tensors in bfloat16 only. In
    float32 its products go through MKL, and a whole aMUSEd-256 forward ran 4 % slower than with
    SDPA's kernel (CPU time, 1 thread); float16 products are emulated on CPUs."""
    out = []
    if q.device.type != "cpu":
        out.append(f"bmm runs on CPU tensors, got {q.device.type}")
    if q.dtype != torch.bfloat16:
        out.append(f"bmm takes bfloat16 only (in {q.dtype} SDPA's CPU kernel is as fast or faster)")
    return out


def bmm_attention(q, k, v, key_padding_mask, scale):
    """softmax(q kᵀ · scale) v over (B, H, L, D) heads, with the key padding mask of ops.attention.

    Returns (B, H, Lq, D), contiguous."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = default_scale(D) if scale is None else scale
    # (B·H, L, D): a copy only for strided views (heads split out of a packed projection)
    q3, k3, v3 = q.reshape(B * H, Lq, D), k.reshape(B * H, Lk, D), v.reshape(B * H, Lk, D)
    # The scores in float32: rounded to bf16 they would be off by up to 2^-9 of their size,
    # which the softmax turns into errors beyond the agreement rule's bound.
    q3, k3 = q3.float(), k3.float()
    scores = torch.baddbmm(q3.new_zeros(()).expand(B * H, Lq, Lk), q3, k3.transpose(1, 2), beta=0.0, alpha=scale)
    if key_padding_mask is not None:
        scores.view(B, H, Lq, Lk).masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v3.dtype)
    out = torch.bmm(probs, v3).view(B, H, Lq, D)
    if key_padding_mask is not None:  # every key masked: softmax gave NaN, the definition is 0
        out = out.masked_fill(~key_padding_mask.any(dim=-1)[:, None, None, None], 0)
    return out
