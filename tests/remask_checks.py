"""Shared inputs and checks of the cfg_sample_remask tests: inputs, and equality up to counted near-ties."""
from __future__ import annotations

import torch

from musefast.reference import agreement
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
    """A fast backend's (tokens, masked) equal the reference's except at counted near-ties (the
    rule lives in musefast.reference.agreement, shared with the per-device self-check).
    Returns the counts, for the test log."""
    why, counts = agreement.remask_disagreement(trace, tokens, masked, value_scale=value_scale, num_to_mask=num_to_mask)
    assert why is None, why
    masked_in = (trace.confidence != float("inf")).sum(1)
    assert torch.equal(trace.masked.sum(1), torch.minimum(num_to_mask.cpu().clamp(min=0), masked_in))
    return counts
