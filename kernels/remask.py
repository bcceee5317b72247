"""Triton kernel of ``cfg_sample_remask``: one MaskGIT decoding step (semantics: musefast/reference/remask.py).

One program owns BLOCK_R rows (b, n). It streams each row's logits in chunks of BLOCK_K
tokens, once: guided logits (CFG, NaN -> -inf, +inf -> max float32), an online max and
softmax denominator, and a running Gumbel-max argmax of ``l / tau + G`` (strict ``>`` keeps
the earlier chunk, ``tl.argmax`` the lowest index inside one: ties go to the lowest token).
G comes from Philox4x32-10 written here with uint32 math, with the counter layout of
musefast/reference/philox.py (Triton's own ``tl.randint`` uses another scheme). With a top-k
filter a per-row threshold is found first by bisection over the float bit patterns (32
counting passes over the row), exact, no sort and no B×N×K intermediate.

The selection tail (which masked positions stay masked) runs as torch ops on the (B, N)
confidences: only B×N values, never B×N×K.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from musefast.reference import philox
from musefast.reference.remask import select_stay_masked

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FLOAT32_MAX = 3.4028234663852886e38


_M0: tl.constexpr = tl.constexpr(philox.PHILOX_M0)
_M1: tl.constexpr = tl.constexpr(philox.PHILOX_M1)
_W0: tl.constexpr = tl.constexpr(philox.PHILOX_W0)
_W1: tl.constexpr = tl.constexpr(philox.PHILOX_W1)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (c0..c3) under uint32 scalar key (k0, k1)."""
    for r in tl.static_range(10):
        if r > 0:
            k0 = tl.add(k0, _W0, sanitize_overflow=False)
            k1 = tl.add(k1, _W1, sanitize_overflow=False)
        hi0 = tl.umulhi(c0, _M0)
        lo0 = tl.mul(c0, _M0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, _M1)
        lo1 = tl.mul(c2, _M1, sanitize_overflow=False)
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
    return c0, c1, c2, c3


@triton.jit
def _log_positive(x):
    """Natural log of positive normal float32 values: the polynomial of csrc/philox.h
    (log_positive), accurate near 1 where -log(u) of a uniform close to 1 must keep its
    relative precision; tl.log may lower to an approximate instruction on GPUs."""
    bits = x.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 126  # x = m * 2^e, m in [0.5, 1)
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.707106781186547524
    e = tl.where(small, e - 1, e)
    f = tl.where(small, (m + m) - 1.0, m - 1.0)
    z = f * f
    y = 7.0376836292e-2 * f - 1.1514610310e-1
    y = y * f + 1.1676998740e-1
    y = y * f - 1.2420140846e-1
    y = y * f + 1.4249322787e-1
    y = y * f - 1.6668057665e-1
    y = y * f + 2.0000714765e-1
    y = y * f - 2.4999993993e-1
    y = y * f + 3.3333331174e-1
    y = y * f * z
    ef = e.to(tl.float32)
    y = y - 2.12194440e-4 * ef
    y = y - 0.5 * z
    return f + y + 0.693359375 * ef


@triton.jit
def _gumbel(x):
    """uint32 words -> float32 Gumbel noise: u = ((x >> 9) * 2 + 1) * 2^-24, -log(-log(u))."""
    u = ((x >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
    return -_log_positive(-_log_positive(u))


@triton.jit
def _guided_chunk(lc_ptr, lu_ptr, row_off_c, row_off_u, offs, ok, guidance, CFG: tl.constexpr):
    l = tl.load(lc_ptr + row_off_c[:, None] + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    if CFG:
        u = tl.load(lu_ptr + row_off_u[:, None] + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        l = u + guidance * (l - u)
    l = tl.where(ok & (l == l), l, float("-inf"))  # NaN -> -inf; padding never wins
    return tl.minimum(l, 3.4028234663852886e38)


@triton.jit
def _ordered_key(l):
    """float32 -> int32 with the same order (-0.0 folded onto +0.0)."""
    bits = (l + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _update_best(v, l, offs_k, start, best, best_idx, best_l):
    """Running argmax of v over chunks (lowest index on ties) and the logit l there."""
    chunk_best, chunk_idx = tl.max(v, axis=1, return_indices=True, return_indices_tie_break_left=True)
    chunk_l = tl.sum(tl.where(offs_k[None, :] == chunk_idx[:, None], l, 0.0), axis=1)
    better = chunk_best > best  # strict: an equal value in a later chunk never wins
    best = tl.where(better, chunk_best, best)
    best_idx = tl.where(better, chunk_idx + start, best_idx)
    best_l = tl.where(better, chunk_l, best_l)
    return best, best_idx, best_l


# The seed words are never specialised: an int argument equal to 1 would otherwise arrive as a
# constexpr (no .to()), and one divisible by 16 would compile another variant of the kernel.
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _remask_rows_kernel(
    lc_ptr, lu_ptr, tokens_ptr, masked_ptr, out_tokens_ptr, conf_ptr,
    R, N, K, stride_cb, stride_cn, stride_ub, stride_un,
    guidance, inv_tau, choice_temperature, top_k, seed_lo, seed_hi, c3_sample, c3_choice,
    CFG: tl.constexpr, SAMPLE: tl.constexpr, TOP_K: tl.constexpr, CHOICE: tl.constexpr, PROB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < R
    active = in_range & (tl.load(masked_ptr + rows, mask=in_range, other=0) != 0)
    b = rows // N
    n = rows % N
    row_off_c = b.to(tl.int64) * stride_cb + n.to(tl.int64) * stride_cn
    row_off_u = b.to(tl.int64) * stride_ub + n.to(tl.int64) * stride_un
    offs_k = tl.arange(0, BLOCK_K)
    groups = tl.arange(0, BLOCK_K // 4)
    k0 = seed_lo.to(tl.uint32)  # int32 or uint32 by value: the same 32 bits either way
    k1 = seed_hi.to(tl.uint32)

    threshold = tl.full([BLOCK_R], float("-inf"), tl.float32)
    if TOP_K:
        # largest key t with #(key >= t) >= top_k, i.e. the k-th largest logit, by bisection
        lo = tl.full([BLOCK_R], -2147483648, tl.int64)
        hi = tl.full([BLOCK_R], 2147483648, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            count = tl.zeros([BLOCK_R], tl.int32)
            for start in range(0, K, BLOCK_K):
                offs = start + offs_k
                ok = active[:, None] & (offs[None, :] < K)
                l = _guided_chunk(lc_ptr, lu_ptr, row_off_c, row_off_u, offs, ok, guidance, CFG)
                hit = (_ordered_key(l).to(tl.int64) >= mid[:, None]) & ok
                count += tl.sum(hit.to(tl.int32), axis=1)
            take = count >= top_k
            lo = tl.where(take, mid, lo)
            hi = tl.where(take, hi, mid)
        key = lo.to(tl.int32)
        threshold = tl.where(key < 0, key ^ 0x7FFFFFFF, key).to(tl.float32, bitcast=True)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_R], tl.int32)
    best_l = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for start in range(0, K, BLOCK_K):
        offs = start + offs_k
        ok = active[:, None] & (offs[None, :] < K)
        l = _guided_chunk(lc_ptr, lu_ptr, row_off_c, row_off_u, offs, ok, guidance, CFG)
        # online softmax denominator (an all -inf row keeps m = -inf and s = 0)
        m_new = tl.maximum(m, tl.max(l, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(l - m_safe[:, None]), axis=1)
        m = m_new
        if SAMPLE:
            # A chunk whose tokens all have l / tau + G_max < the best value so far cannot hold
            # the argmax (G < 16.64): skip its noise. Exact; saves most work on peaked rows.
            # (clamped to finite values so that no inf - inf appears; exact all the same)
            bound = tl.clamp(tl.max(l, axis=1) * inv_tau, -3.0e38, 3.0e38)
            so_far = tl.clamp(best, -3.0e38, 3.0e38)
            hopeful = active & (bound + 17.0 + 2e-6 * tl.maximum(tl.abs(bound), tl.abs(so_far)) >= so_far)
            if tl.max(hopeful.to(tl.int32), axis=0) > 0:
                c0 = (start // 4 + groups).to(tl.uint32)
                c0 = tl.broadcast_to(c0[None, :], (BLOCK_R, BLOCK_K // 4))
                c1 = tl.broadcast_to(n.to(tl.uint32)[:, None], (BLOCK_R, BLOCK_K // 4))
                c2 = tl.broadcast_to(b.to(tl.uint32)[:, None], (BLOCK_R, BLOCK_K // 4))
                c3 = tl.full((BLOCK_R, BLOCK_K // 4), c3_sample, tl.uint32)
                w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
                # token 4g + j takes word j of group g
                words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
                v = l * inv_tau + _gumbel(words)
                v = tl.where(l >= threshold[:, None], v, float("-inf"))
                best, best_idx, best_l = _update_best(v, l, offs_k, start, best, best_idx, best_l)
        else:
            best, best_idx, best_l = _update_best(l, l, offs_k, start, best, best_idx, best_l)

    dead = m == float("-inf")
    lp = (best_l - tl.where(dead, 0.0, m)) - tl.log(tl.where(dead, 1.0, s))
    conf = lp
    if PROB:
        conf = tl.exp(lp)
    if CHOICE:
        zero = tl.zeros([BLOCK_R], tl.uint32)
        g0, _, _, _ = _philox4x32_10(zero, n.to(tl.uint32), b.to(tl.uint32), zero + c3_choice, k0, k1)
        conf = conf + choice_temperature * _gumbel(g0)
    conf = tl.where(dead, float("-inf"), conf)
    token = tl.where(dead, 0, best_idx).to(tl.int64)
    old = tl.load(tokens_ptr + rows, mask=in_range, other=0)
    tl.store(out_tokens_ptr + rows, tl.where(active, token, old), mask=in_range)
    tl.store(conf_ptr + rows, tl.where(active, conf, float("inf")), mask=in_range)


def _blocks(K: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_K): a program covers ~4096 logits (the interpreter: fewer, larger ops)."""
    block_k = min(triton.next_power_of_2(max(K, 4)), 4096 if _INTERPRET else 2048)
    block_r = max(1, min(64, (16384 if _INTERPRET else 4096) // block_k))
    return block_r, block_k


def cfg_sample_remask_triton(
    logits: torch.Tensor, uncond: torch.Tensor | None, tokens: torch.Tensor, masked: torch.Tensor,
    num_to_mask: torch.Tensor, *, guidance_scale: float, temperature: float, choice_temperature: float,
    top_k: int, confidence: str, seed: int, step: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs of ``ops.cfg_sample_remask`` (top_k 0 = no filter) -> (tokens, masked)."""
    B, N, K = logits.shape
    if logits.stride(2) != 1:
        logits = logits.contiguous()
    if uncond is not None and uncond.stride(2) != 1:
        uncond = uncond.contiguous()
    tokens_c, masked_c = tokens.contiguous(), masked.contiguous()
    out_tokens = torch.empty_like(tokens_c)
    conf = torch.empty(B, N, dtype=torch.float32, device=logits.device)
    R = B * N
    if R:
        cfg = uncond is not None and guidance_scale != 1.0
        lu = uncond if cfg else logits
        block_r, block_k = _blocks(K)
        k0, k1 = philox.split_seed(seed)
        # Triton launches on the current device: make it the logits' (multi-GPU hosts).
        with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
            _remask_rows_kernel[(triton.cdiv(R, block_r),)](
                logits, lu, tokens_c, masked_c.view(torch.uint8), out_tokens, conf,
                R, N, K, logits.stride(0), logits.stride(1), lu.stride(0), lu.stride(1),
                float(torch.tensor(guidance_scale, dtype=torch.float32)),
                float(torch.tensor(1.0 / temperature if temperature > 0 else 0.0, dtype=torch.float32)),
                float(torch.tensor(choice_temperature, dtype=torch.float32)),
                top_k, k0, k1,
                philox.counter_word3(philox.STREAM_SAMPLE, step), philox.counter_word3(philox.STREAM_CHOICE, step),
                CFG=cfg, SAMPLE=temperature > 0, TOP_K=top_k > 0, CHOICE=choice_temperature != 0,
                PROB=confidence == "prob", BLOCK_R=block_r, BLOCK_K=block_k,
            )
    stay = select_stay_masked(conf, masked_c, num_to_mask.to(logits.device))
    return out_tokens, stay
