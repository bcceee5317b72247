"""Triton ``qk_norm_rope``: q/k RMSNorm + rotary embedding + head split, one program per row.

A program owns one (batch, row) of one stream and all its heads: a (BLOCK_H, BLOCK_P) tile of
channel pairs, loaded as the even and the odd channel of each pair (two strided loads), so the
rotation needs no shuffles. The per-head mean square is a row sum of the tile; math in float32,
one rounding at the store. q, k and v land in the (3, B, H, L_total, D) output at the stream's
row offset, so the streams of a joint sequence need no concatenation afterwards. Head counts and
half-widths that are not powers of two are padded with load/store masks.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rotate_store(row, w_ptr, dst, cos, sin, heads, pairs, mask, D, eps):
    x0 = tl.load(row + heads * D + 2 * pairs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(row + heads * D + 2 * pairs + 1, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x0 * x0 + x1 * x1, axis=1) / D + eps)
    w0 = tl.load(w_ptr + 2 * pairs, mask=pairs < D // 2, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + 2 * pairs + 1, mask=pairs < D // 2, other=0.0).to(tl.float32)
    y0 = x0 * inv[:, None] * w0
    y1 = x1 * inv[:, None] * w1
    tl.store(dst + 2 * pairs, (y0 * cos - y1 * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + 2 * pairs + 1, (y1 * cos + y0 * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(x_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, out_ptr, L, offset, L_total, H, stride_b,
                         stride_l, part_stride, eps, D: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b, l = pid // L, pid % L
    heads = tl.arange(0, BLOCK_H)[:, None]
    pairs = tl.arange(0, BLOCK_P)[None, :]
    mask = (heads < H) & (pairs < D // 2)
    row = x_ptr + b * stride_b + l * stride_l
    cos = tl.load(cos_ptr + (offset + l) * (D // 2) + pairs, mask=pairs < D // 2, other=0.0)
    sin = tl.load(sin_ptr + (offset + l) * (D // 2) + pairs, mask=pairs < D // 2, other=0.0)
    dst = out_ptr + ((b * H + heads) * L_total + offset + l) * D
    _norm_rotate_store(row, wq_ptr, dst, cos, sin, heads, pairs, mask, D, eps)
    _norm_rotate_store(row + H * D, wk_ptr, dst + part_stride, cos, sin, heads, pairs, mask, D, eps)
    for half in tl.static_range(2):  # v: the even, then the odd channel of each pair
        v = tl.load(row + 2 * H * D + heads * D + 2 * pairs + half, mask=mask)
        tl.store(dst + 2 * part_stride + 2 * pairs + half, v, mask=mask)


def qk_norm_rope_triton(qkv: list[torch.Tensor], q_weight: list[torch.Tensor], k_weight: list[torch.Tensor],
                        cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """Validated streams qkv[i] (B, L_i, 3·H·D), weights (D,), tables (ΣL_i, D/2) float32 ->
    (3, B, H, ΣL_i, D) contiguous in qkv's dtype (see musefast.ops.rope)."""
    B, _, width = qkv[0].shape
    D = width // (3 * heads)
    L_total = sum(x.shape[1] for x in qkv)
    out = torch.empty((3, B, heads, L_total, D), dtype=qkv[0].dtype, device=qkv[0].device)
    cos, sin = cos.contiguous(), sin.contiguous()
    offset = 0
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        for x, wq, wk in zip(qkv, q_weight, k_weight):
            L = x.shape[1]
            if B * L:
                x = x if x.stride(2) == 1 else x.contiguous()
                _qk_norm_rope_kernel[(B * L,)](
                    x, wq.contiguous(), wk.contiguous(), cos, sin, out, L, offset, L_total, heads,
                    x.stride(0), x.stride(1), out.stride(0), float(eps),
                    D=D, BLOCK_H=triton.next_power_of_2(heads), BLOCK_P=triton.next_power_of_2(D // 2))
            offset += L
    return out
