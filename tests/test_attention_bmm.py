"""The CPU ``bmm`` backend of the attention op (musefast.ops.attention) at aMUSEd's sizes, against the
reference by the agreement rule of the per-device self-check (musefast.reference.agreement).
The generic backend tests (odd shapes, masks, strided and broadcast inputs) are in test_attention.py."""
import pytest
import torch

from musefast import ops
from musefast.ops.attention import BMM_MAX_KEYS as MAX_KEYS
from musefast.ops import selfcheck
from musefast.ops.registry import BackendUnavailableError
from musefast.reference import agreement


def _rule(q, k, v, mask, out):
    ref32 = ops.attention(q.float(), k.float(), v.float(), key_padding_mask=mask, backend="reference")
    ref_same = ops.attention(q, k, v, key_padding_mask=mask, backend="reference")
    return agreement.attention_disagreement(out, ref32, ref_same, mask)


@pytest.mark.parametrize("lk,heads,masked", [(160, 16, False), (77, 16, True), (77, 12, False)])
def test_bmm_agrees_at_amused_sizes(lk, heads, masked):
    # heads split out of a packed QKV projection (a strided view), as the modules pass them
    g = torch.Generator().manual_seed(lk + heads)
    q = (3 * torch.randn(2, 256, heads, 64, generator=g)).bfloat16().transpose(1, 2)
    k, v = (torch.randn(2, heads, lk, 64, generator=g).bfloat16() for _ in range(2))
    mask = (torch.arange(lk) < 20).expand(2, lk) if masked else None
    out = ops.attention(q, k, v, key_padding_mask=mask, backend="bmm")
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert _rule(q, k, v, mask, out) is None


def test_bmm_large_scores_stay_finite_and_dead_rows_are_zero():
    g = torch.Generator().manual_seed(3)
    q = (40 * torch.randn(3, 2, 33, 32, generator=g)).bfloat16()
    k, v = (torch.randn(3, 2, 70, 32, generator=g).bfloat16() for _ in range(2))
    mask = torch.rand(3, 70, generator=g) < 0.5
    mask[1] = False
    out = ops.attention(q, k, v, key_padding_mask=mask, backend="bmm")
    assert bool(torch.isfinite(out).all()) and bool((out[1] == 0).all())
    assert _rule(q, k, v, mask, out) is None


def test_selfcheck_passes_bmm_and_its_bf16_case_rejects_bf16_scores():
    assert selfcheck.check_attention("bmm", torch.device("cpu")) is None
    # the same products with the scores rounded to bf16 (what a plain bf16 baddbmm gives) fail the
    # self-check's bf16 case: the case can tell the two apart
    case = next(c for c in selfcheck._attention_cases(torch.device("cpu")) if c.label.startswith("bf16"))
    q, k, v = case.args
    mask = case.kwargs["key_padding_mask"]
    scores = (torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5)  # bf16 scores
    scores = scores.float().masked_fill(~mask[:, None, None, :], float("-inf"))
    rounded = torch.matmul(torch.softmax(scores, -1).bfloat16(), v)
    rounded = torch.where(mask.any(-1)[:, None, None, None], rounded, 0)
    assert _rule(q, k, v, mask, rounded) is not None


def test_bmm_declines_other_dtypes_and_long_key_sequences_with_a_reason():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(BackendUnavailableError, match="bfloat16 only"):
        ops.attention(q, q, q, backend="bmm")
    q, k = q.bfloat16(), torch.randn(1, 2, MAX_KEYS + 1, 16).bfloat16()
    with pytest.raises(BackendUnavailableError, match=f"up to {MAX_KEYS} keys"):
        ops.attention(q, k, k, backend="bmm")
