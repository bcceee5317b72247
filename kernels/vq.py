"""Triton kernel of ``vq_nearest``: fused L2 nearest-codebook search (argmin, no N×K matrix).

One program owns BLOCK_N rows of ``z``. It streams the codebook in tiles of BLOCK_K codes,
scores each tile with one ``tl.dot`` (fp32 accumulation) and keeps a running min/argmin per
row in registers; the N×K distance matrix never exists.

Ranking uses ``||c||² − 2 z·c`` (``||z||²`` is constant per row and is added back only for
the returned distance, clamped at 0; NaN stays NaN). Codebook squared norms are precomputed in
fp32 once per call. fp32 inputs use ``input_precision="ieee"``: TF32 keeps ~10 mantissa bits, which flips
argmins between close codes. fp16/bf16 products are exact in fp32, accumulated in fp32.

Any D: the D axis is tiled in BLOCK_D-wide chunks (a power of two ≥ 16, masked past D); the
first chunk of the rows stays in registers for the whole codebook sweep, further chunks (only
when D > BLOCK_D) are re-read per tile. Any K: codes past K get a +inf norm so they never win.
Ties: ``tl.min(..., return_indices=True)`` breaks ties to the left inside a tile and a strict
``<`` keeps the earlier tile, so the lowest index wins (up to floating-point near-ties).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from musefast.kernels._tuning import launcher

# Widest D chunk. fp32 dots run on FMAs (ieee) with both operand tiles in shared memory and
# unrolled per element: 32 keeps shared memory < 100 KB and compile times of seconds.
# 16-bit dots run on tensor cores: 128 covers the usual VQ widths (8..128) in one chunk.
_MAX_BLOCK_D = {torch.float32: 32, torch.float16: 128, torch.bfloat16: 128}


# N and K only bound loops and masks: specialising on their divisibility would recompile the
# kernel per batch size for nothing. The buckets are autotune keys, never read by the kernel.
@triton.jit(do_not_specialize=["N", "K", "N_BUCKET", "K_BUCKET"])
def _vq_nearest_kernel(
    z_ptr, cb_ptr, cb_sqnorm_ptr, idx_ptr, dist_ptr,
    N, K, D,
    stride_zn, stride_zd, stride_ck, stride_cd,
    N_BUCKET, K_BUCKET,
    BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_zn
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)

    # First D chunk of the rows: resident for the whole sweep (all of z when D <= BLOCK_D).
    z0 = tl.load(z_rows + offs_d[None, :] * stride_zd,
                 mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + offs_k
        code_ok = codes < K
        c_rows = cb_ptr + codes.to(tl.int64)[:, None] * stride_ck  # K·D may reach 2³¹
        c0 = tl.load(c_rows + offs_d[None, :] * stride_cd,
                     mask=code_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if IEEE:
            acc = tl.dot(z0, tl.trans(c0), input_precision="ieee")
        else:
            acc = tl.dot(z0, tl.trans(c0))
        # Further D chunks (zero iterations when D <= BLOCK_D).
        for d0 in range(BLOCK_D, D, BLOCK_D):
            dd = d0 + offs_d
            d_ok = dd < D
            zc = tl.load(z_rows + dd[None, :] * stride_zd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            cc = tl.load(c_rows + dd[None, :] * stride_cd, mask=code_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(zc, tl.trans(cc), acc, input_precision="ieee")
            else:
                acc = tl.dot(zc, tl.trans(cc), acc)
        sqnorm = tl.load(cb_sqnorm_ptr + codes, mask=code_ok, other=float("inf"))
        score = sqnorm[None, :] - 2.0 * acc
        # A NaN in z makes its row's scores NaN: rank them +inf, so no code wins, the row keeps
        # index 0 and its distance (||z||² + inf) stays NaN. (NaN inside a min is left to the
        # backend: the interpreter raises, GPUs may pick any lane.)
        score = tl.where(score == score, score, float("inf"))
        tile_best, tile_idx = tl.min(score, axis=1, return_indices=True)
        better = tile_best < best  # strict: an equal score in a later tile never wins
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx + k0, best_idx)

    z0f = z0.to(tl.float32)
    z_sqnorm = tl.sum(z0f * z0f, axis=1)
    for d0 in range(BLOCK_D, D, BLOCK_D):
        dd = d0 + offs_d
        zc = tl.load(z_rows + dd[None, :] * stride_zd, mask=row_ok[:, None] & (dd[None, :] < D),
                     other=0.0).to(tl.float32)
        z_sqnorm += tl.sum(zc * zc, axis=1)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
    # Clamp rounding below 0 but keep NaN (a NaN row: index 0, distance NaN); tl.maximum
    # lowers to a max that returns the non-NaN operand on GPUs.
    dist = z_sqnorm + best
    tl.store(dist_ptr + rows, tl.where(dist < 0.0, 0.0, dist), mask=row_ok)


_kernel, _FIXED = launcher(
    _vq_nearest_kernel,
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
            (128, 128, 8, 3), (64, 64, 4, 2), (128, 128, 8, 2), (32, 128, 4, 3),
        ]
    ],
    # MUSEFAST_TRITON_FIXED_CONFIG=1: small enough for the widest chunk (16-bit, BLOCK_D=128:
    # 2 stages of a 64×128 code tile) on any sm_80+ device.
    pinned=triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    # The interpreter's cost is Python overhead per block op, so large blocks are the fast ones.
    interpreter={"BLOCK_N": 128, "BLOCK_K": 256},
    # Bounded key (triton adds the tensor dtypes): N and K by coarse bucket, D by its chunk
    # width, so a long-running process tunes a handful of times at most. Configs that exceed
    # the device's shared memory are skipped by the autotuner (OutOfResources).
    key=["N_BUCKET", "K_BUCKET", "BLOCK_D"],
)


def _block_d(D: int, dtype: torch.dtype) -> int:
    return min(max(16, triton.next_power_of_2(D)), _MAX_BLOCK_D[dtype])


def vq_nearest_triton(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry (squared L2) of every row of ``z``.

    Args:
        z: (N, D) float32/float16/bfloat16, any strides.
        codebook: (K, D), same dtype and device as ``z``, K >= 1.

    Returns:
        indices (N,) int64 and squared distances (N,) float32 (clamped at 0). Ties go to the
        lowest index, up to floating-point near-ties.
    """
    if z.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"z must be (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z's D ({z.shape[1]}) must equal codebook's D ({codebook.shape[1]})")
    if z.dtype != codebook.dtype or z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"z and codebook must share one of float32/float16/bfloat16, got {z.dtype} and {codebook.dtype}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0): there is no nearest entry")
    N, D = z.shape
    K = codebook.shape[0]
    indices = torch.empty(N, dtype=torch.int64, device=z.device)
    distances = torch.empty(N, dtype=torch.float32, device=z.device)
    if N == 0:
        return indices, distances
    if D == 0:
        return indices.zero_(), distances.zero_()
    # Unit stride along D keeps the loads vectorised; other strides are honoured as given.
    if z.stride(1) != 1:
        z = z.contiguous()
    codebook = codebook.contiguous()
    cb_sqnorm = codebook.float().square().sum(1)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]),)

    # Triton launches on the current device: make it z's (a no-op on CPU / the interpreter).
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        _kernel[grid](
            z, codebook, cb_sqnorm, indices, distances,
            N, K, D,
            z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
            N_BUCKET=0 if N <= 4096 else 1,
            K_BUCKET=triton.next_power_of_2(K),
            BLOCK_D=_block_d(D, z.dtype),
            IEEE=z.dtype == torch.float32,
            **_FIXED,
        )
    return indices, distances
