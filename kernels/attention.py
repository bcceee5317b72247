"""Triton flash-attention forward: bidirectional, any lengths, key padding mask as a bias.

One program owns BLOCK_M queries of one (batch, head). It streams the keys/values in tiles of
BLOCK_N, scores a tile with one ``tl.dot`` (fp32 accumulation) and folds it into a running
(max, sum, output) triple — the online softmax — so the Lq×Lk score matrix never exists.

- exp2 instead of exp: the softmax scale and log2(e) are folded into one multiplier, so each
  score costs one multiply and one exp2 (the MUFU instruction) and no extra scaling.
- Head dims that are not a power of two (80, 96) are padded to one (``BLOCK_D``) with load
  masks; the padded lanes are zeros, add nothing to q·k and are never stored.
- Any Lq/Lk: query rows and key columns past the end are masked; a key that is past the end
  or padded gets a −∞ bias, so it takes no softmax mass. No unpadding, no Python control
  flow on tensor values.
- Padded keys are usually a suffix (text tokens): the host passes, per batch element, the
  index after its last attended key, and the key loop stops there — padded cross-attention
  does less work instead of computing scores it then throws away.
- A query with no attended key ends with sum 0 and output 0 (zeros, not NaN, by definition).
- fp32 inputs use ``input_precision="ieee"`` (TF32 would lose ~3 decimal digits); fp16/bf16
  products are exact in fp32. Probabilities are cast to v's dtype for the second dot, as
  every flash-attention does.
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from musefast.kernels._tuning import launcher

_LOG2E = math.log2(math.e)
_MAX_GRID_Y = 65535  # CUDA limit of grid dim 1, which carries B·H


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, kv_end_ptr,
    H, Lq, Lk, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    LQ_BUCKET, LK_BUCKET, WORK_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < Lq

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    if HAS_MASK:
        kv_end = tl.load(kv_end_ptr + b)
    else:
        kv_end = Lk

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):
        offs_kn = start_n + offs_n
        key_ok = offs_kn < Lk
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + offs_kn * stride_mn, mask=key_ok, other=0)
            key_ok = key_ok & (keep != 0)
        # Padded keys load as zeros (never garbage into the dot) and get a −∞ bias.
        key_bias = tl.where(key_ok, 0.0, float("-inf"))
        kt = tl.load(
            k_base + offs_kn[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & key_ok[None, :], other=0.0,
        )
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale + key_bias[None, :]

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no attended key so far keeps m = −∞; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(
            v_base + offs_kn[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=key_ok[:, None] & d_ok[None, :], other=0.0,
        )
        acc = acc * alpha[:, None]
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    # l == 0 only for rows without any attended key, whose acc is 0: output 0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )


def _bucket(n: int, lo: int, hi: int) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), lo), hi)


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (Lq = 1 needs no 128-row tile)."""
    lq, lk = named_args["LQ_BUCKET"], named_args["LK_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, lq) and c.kwargs["BLOCK_N"] <= max(32, lk)]
    return kept or configs[:1]


_kernel, _FIXED = launcher(
    _attention_fwd_kernel,
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 4),
            (64, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 4), (32, 64, 4, 3), (32, 32, 2, 3),
        ]
    ],
    # MUSEFAST_TRITON_FIXED_CONFIG=1: fits the widest head (fp32, BLOCK_D=256: two stages of
    # 32-key K and V tiles, 128 KB of shared memory) on sm_80+.
    pinned=triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    interpreter={"BLOCK_M": 64, "BLOCK_N": 32},  # fastest of those measured in the interpreter
    # Bounded key (triton adds the tensor dtypes): lengths and total work by power-of-two
    # bucket, clamped, so a long-running process tunes a handful of times at most.
    key=["LQ_BUCKET", "LK_BUCKET", "WORK_BUCKET", "HEAD_DIM", "HAS_MASK"],
    prune_configs_by={"early_config_prune": _prune_configs},
)


def grid_reasons(q: torch.Tensor) -> list[str]:
    """Shapes this kernel's launch grid cannot cover."""
    bh = q.shape[0] * q.shape[1]
    return [f"B·H = {bh} exceeds the grid limit {_MAX_GRID_Y}"] if bh > _MAX_GRID_Y else []


def kv_end(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """(B, Lk) bool -> (B,) int32: index after the last attended key (0 if none)."""
    positions = torch.arange(1, key_padding_mask.shape[1] + 1, device=key_padding_mask.device, dtype=torch.int32)
    return (key_padding_mask * positions).amax(dim=1).to(torch.int32)


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Flash-attention forward.

    Args:
        q: (B, H, Lq, D); k, v: (B, H, Lk, D); one dtype (float32/float16/bfloat16), one
            device; any strides (broadcast batch/head strides are kept as they are).
        key_padding_mask: (B, Lk) bool, True = attend.
        scale: softmax scale, default 1/sqrt(D).

    Returns:
        (B, H, Lq, D) contiguous, q's dtype. Rows without an attended key are zeros.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    # Unit stride along D keeps the loads vectorised; other strides are honoured as given.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if key_padding_mask is not None:
        mask = key_padding_mask.view(torch.uint8)  # bool pointers are awkward in Triton
        ends = kv_end(key_padding_mask)
        stride_mb, stride_mn = mask.stride()
    else:
        mask, ends, stride_mb, stride_mn = q, q, 0, 0  # never read (HAS_MASK=False)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    def grid(meta):
        return (triton.cdiv(Lq, meta["BLOCK_M"]), B * H)

    # Triton launches on the current device: make it q's (multi-GPU hosts).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _kernel[grid](
            q, k, v, out, mask, ends,
            H, Lq, Lk, scale * _LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            stride_mb, stride_mn,
            _bucket(Lq, 16, 8192), _bucket(Lk, 16, 8192), _bucket(B * H * Lq, 1 << 12, 1 << 20),
            HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
            HAS_MASK=key_padding_mask is not None, IEEE=q.dtype == torch.float32,
            **_FIXED,
        )
    return out
