"""MusefastAttnProcessor reproduces diffusers' own AttnProcessor2_0 (diffusers: test extra).

Tiny random models are built offline; the same module runs once with diffusers' processor
and once with musefast's, on the same inputs.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

import musefast.compat.diffusers as compat  # noqa: E402
from musefast.compat.diffusers import MusefastAttnProcessor  # noqa: E402
from musefast.ops.attention import ATTENTION  # noqa: E402


@pytest.fixture
def musefast_calls(monkeypatch):
    """Counts the processor's calls of musefast.ops.attention (vs its SDPA fallback)."""
    calls = []
    real = compat.attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("key_padding_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(compat, "attention", counting)
    return calls


def _skip_unless_runs(backend):
    x = torch.empty(1, 2, 16, 16)
    reasons = ATTENTION.backends[backend].reasons(x, x, x, None, None)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def _tiny_uvit():
    return diffusers.UVit2DModel(
        hidden_size=32, use_bias=True, cond_embed_dim=16, micro_cond_encode_dim=2, micro_cond_embed_dim=10,
        encoder_hidden_size=16, vocab_size=33, codebook_size=32, in_channels=16, block_out_channels=32,
        num_res_blocks=1, block_num_heads=2, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, sample_size=4,
    ).eval()


@pytest.mark.parametrize("backend", ["sdpa", "reference", "triton"])
def test_uvit2d_logits_match_diffusers_processor(backend, musefast_calls):
    _skip_unless_runs(backend)
    model = _tiny_uvit()
    batch = 2
    inputs = dict(
        input_ids=torch.randint(0, 33, (batch, 8, 8)),
        encoder_hidden_states=torch.randn(batch, 7, 16),
        pooled_text_emb=torch.randn(batch, 16),
        micro_conds=torch.rand(batch, 5) * 512,
    )
    with torch.no_grad():
        model.set_attn_processor(AttnProcessor2_0())
        expected = model(**inputs)
        model.set_attn_processor(MusefastAttnProcessor(backend=backend))
        got = model(**inputs)
    n_attention = len(model.attn_processors)
    assert n_attention == 8 and len(musefast_calls) == n_attention  # every layer ran on musefast
    assert got.shape == (batch, 32, 8, 8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _run_both(attn, x, **kwargs):
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        expected = attn(x, **kwargs)
        attn.set_processor(MusefastAttnProcessor())
        got = attn(x, **kwargs)
    return got, expected


def _keep(batch, lk):
    keep = torch.rand(batch, lk) < 0.6
    keep[:, 0] = True
    return keep


MASKS = {
    # name: (mask builder (batch, lk) -> mask, runs on musefast?)
    "additive padding bias": (lambda b, lk: (~_keep(b, lk)).float()[:, None] * -10000.0, True),
    "-inf padding bias": (lambda b, lk: torch.zeros(b, 1, lk).masked_fill(~_keep(b, lk)[:, None], float("-inf")), True),
    "bool with an empty row": (lambda b, lk: torch.cat([_keep(b - 1, lk), torch.zeros(1, lk, dtype=torch.bool)])[:, None], True),
    # diffusers' finite bias averages all values for an all-masked row: SDPA fallback
    "bias with an all-masked row": (lambda b, lk: torch.cat([torch.zeros(b - 1, lk), torch.full((1, lk), -10000.0)])[:, None], False),
    "real bias": (lambda b, lk: torch.randn(b, 1, lk), False),
    "per-query bool mask": (lambda b, lk: torch.rand(b, 10, lk) < 0.7, False),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_cross_attention_masks(name, musefast_calls):
    build, on_musefast = MASKS[name]
    torch.manual_seed(1)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, bias=True).eval()
    x, context = torch.randn(3, 10, 32), torch.randn(3, 12, 24)
    mask = build(3, 12)
    got, expected = _run_both(attn, x, encoder_hidden_states=context, attention_mask=mask)
    assert len(musefast_calls) == int(on_musefast)
    if on_musefast:
        assert musefast_calls[0] is not None and musefast_calls[0].shape == (3, 12)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_feature_map_group_norm_spatial_norm_residual_rescale(musefast_calls):
    attn = Attention(
        query_dim=32, heads=2, dim_head=16, norm_num_groups=4, spatial_norm_dim=8,
        residual_connection=True, rescale_output_factor=2.0, qk_norm="rms_norm",
    ).eval()
    x = torch.randn(2, 32, 4, 5)  # (B, C, H, W)
    temb = torch.randn(2, 8, 2, 2)  # spatial-norm conditioning map
    got, expected = _run_both(attn, x, temb=temb)
    assert got.shape == x.shape and len(musefast_calls) == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_norm_and_qk_norm(musefast_calls):
    attn = Attention(
        query_dim=32, cross_attention_dim=24, heads=4, dim_head=8, cross_attention_norm="layer_norm",
        qk_norm="layer_norm",
    ).eval()
    x, context = torch.randn(2, 9, 32), torch.randn(2, 5, 24)
    got, expected = _run_both(attn, x, encoder_hidden_states=context)
    assert len(musefast_calls) == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
