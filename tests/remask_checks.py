"""Shared helpers of the cfg_sample_remask tests: inputs, and equality up to counted near-ties."""
from __future__ import annotations

import torch

from musefast.reference import remask as ref


def make_inputs(B, N, K, dtype=torch.float32, *, cfg=False, masked_fraction=0.7, scale=2.0, seed=0):
    """Random logits (B, N, K) [+ uncond], tokens, a random mask and per-image num_to_mask."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, N, K, generator=g)).to(dtype)
    uncond = (scale * torch.randn(B, N, K, generator=g)).to(dtype) if cfg else None
    tokens = torch.randint(0, K, (B, N), generator=g)
    masked = torch.rand(B, N, generator=g) < masked_fraction
    num_to_mask = (masked.sum(1).float() * torch.rand(B, generator=g)).long()
    return logits, uncond, tokens, masked, num_to_mask


def assert_step_matches(trace: ref.StepTrace, tokens: torch.Tensor, masked: torch.Tensor, *, value_scale: float,
                        num_to_mask: torch.Tensor) -> dict:
    """A fast backend's (tokens, masked) equal the reference's except at counted near-ties.

    A token may differ only where the reference's best and second-best Gumbel-max values are
    within a few float32 ulps (``margin``): FMA contraction and each library's exp/log round
    differently. A position's mask may differ only in an image whose selection boundary (the
    gap between the n-th and (n+1)-th lowest confidence) is that close, or where a token near-
    tie changed a confidence (then at most two positions per differing token move).
    Near-ties must stay rare (< 1% of positions), so the tolerance cannot hide a real bug.
    Returns the counts, for the test log.
    """
    tokens, masked = tokens.cpu(), masked.cpu()
    assert tokens.dtype == torch.int64 and masked.dtype == torch.bool
    tol_v = 4e-6 * value_scale
    token_diff = tokens != trace.tokens
    # Saturated values (inf, or max float32 that no addition moves) tie exactly on every
    # backend: the lowest index wins, no rounding can differ. Other ties within tol_v are near-ties.
    saturated = (trace.margin == 0) & (trace.best.abs() >= torch.finfo(torch.float32).max)
    near_v = (trace.margin <= tol_v) & ~saturated
    assert not bool((token_diff & ~near_v).any()), (
        f"{int((token_diff & ~near_v).sum())} tokens differ away from near-ties "
        f"(first at {(token_diff & ~near_v).nonzero()[:5].tolist()})"
    )
    conf = trace.confidence
    finite = conf[torch.isfinite(conf)]
    tol_c = 4e-6 * (1.0 + (float(finite.abs().max()) if finite.numel() else 0.0))
    mask_diff = masked != trace.masked
    near_c = 0
    for b in range(conf.shape[0]):
        diff_b = int(mask_diff[b].sum())
        moved_tokens = int(token_diff[b].sum())
        if moved_tokens:
            assert diff_b <= 2 * moved_tokens, f"image {b}: {diff_b} mask changes for {moved_tokens} token near-ties"
            continue
        values = torch.sort(conf[b][conf[b] != float("inf")]).values  # the input's masked positions
        n = int(trace.masked[b].sum())
        if 0 < n < values.numel() and float(values[n] - values[n - 1]) <= tol_c:
            near_c += 1
            lo, hi = float(values[n - 1]), float(values[n])
            near_pos = (conf[b] >= lo - tol_c) & (conf[b] <= hi + tol_c)
            assert not bool((mask_diff[b] & ~near_pos).any()), f"image {b}: mask differs away from the boundary"
        else:
            assert diff_b == 0, f"image {b}: {diff_b} positions differ with a clear selection boundary"
    positions = tokens.numel()
    near_total = int(near_v[trace.margin != float("inf")].sum()) + near_c
    assert near_total <= max(2, positions // 100), f"{near_total} near-ties among {positions} positions"
    masked_in = (conf != float("inf")).sum(1)
    expected_stay = torch.minimum(num_to_mask.cpu().clamp(min=0), masked_in)
    assert torch.equal(masked.sum(1), expected_stay), "wrong number of positions stay masked"
    assert torch.equal(trace.masked.sum(1), expected_stay)
    return {"near_ties": near_total, "token_mismatches": int(token_diff.sum()), "mask_mismatches": int(mask_diff.sum())}
