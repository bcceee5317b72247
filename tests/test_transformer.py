"""Muse base / class-conditional / super-res transformers on tiny random configs."""
import pytest
import torch

from musefast.models.transformer import (
    Context,
    MuseTransformer,
    MuseTransformerConfig,
    SuperResConfig,
    SuperResTransformer,
)


def tiny(**kw):
    base = dict(codebook_size=64, grid_size=4, dim=32, depth=2, num_heads=2, text_dim=16)
    base.update(kw)
    return MuseTransformerConfig(**base)


def _text(b=2, length=5):
    hidden = torch.randn(b, length, 16)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[1, 3:] = False
    return hidden, mask


@pytest.mark.parametrize("mlp,norm,qk_norm", [("gelu", "layernorm", False), ("geglu", "rmsnorm", True)])
def test_logits_shape_and_prepared_context(mlp, norm, qk_norm):
    model = MuseTransformer(tiny(mlp=mlp, norm=norm, qk_norm=qk_norm)).eval()
    tokens = torch.randint(0, 65, (2, 4, 4))
    hidden, mask = _text()
    logits = model(tokens, hidden, mask)
    assert logits.shape == (2, 16, 64)
    ctx = model.prepare_context(hidden, mask)
    assert torch.allclose(model(tokens, context=ctx), logits, atol=1e-6)
    assert torch.allclose(model(tokens.flatten(1), context=ctx), logits, atol=1e-6)


def test_padding_tokens_do_not_change_logits():
    model = MuseTransformer(tiny()).eval()
    tokens = torch.randint(0, 65, (1, 16))
    hidden = torch.randn(1, 7, 16)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    a = model(tokens, hidden, mask)
    hidden2 = hidden.clone()
    hidden2[:, 4:] = torch.randn(1, 3, 16) * 100  # garbage under the padding
    assert torch.allclose(model(tokens, hidden2, mask), a, atol=1e-5)


def test_backends_give_same_logits():
    cfg_ref, cfg_fast = tiny(backend="reference"), tiny(backend="sdpa")
    ref, fast = MuseTransformer(cfg_ref).eval(), MuseTransformer(cfg_fast).eval()
    fast.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 65, (2, 16))
    hidden, mask = _text()
    assert torch.allclose(ref(tokens, hidden, mask), fast(tokens, hidden, mask), atol=1e-5)


def test_context_cat():
    model = MuseTransformer(tiny()).eval()
    hidden, mask = _text()
    ctx = model.prepare_context(hidden, mask)
    both = Context.cat([ctx, Context(ctx.kvs, None)])
    assert both.mask.shape == (4, 5) and bool(both.mask[2:].all())
    tokens = torch.randint(0, 65, (4, 16))
    out = model(tokens, context=both)
    assert torch.allclose(out[:2], model(tokens[:2], context=ctx), atol=1e-5)


def test_class_conditional_mode():
    model = MuseTransformer(tiny(text_dim=None, num_classes=10)).eval()
    tokens = torch.randint(0, 65, (3, 16))
    logits = model(tokens, class_labels=torch.tensor([0, 5, 10]))  # 10 = null class
    assert logits.shape == (3, 16, 64)
    assert not torch.allclose(logits[0], model(tokens, class_labels=torch.tensor([1, 5, 10]))[0])
    with pytest.raises(ValueError, match="class_labels"):
        model(tokens)


def test_super_res_shapes_and_low_res_conditioning():
    cfg = SuperResConfig(high=tiny(grid_size=8), low_codebook_size=32, low_grid_size=4, encoder_depth=1)
    model = SuperResTransformer(cfg).eval()
    tokens = torch.randint(0, 65, (2, 8, 8))
    low = torch.randint(0, 32, (2, 4, 4))
    hidden, mask = _text()
    logits = model(tokens, low, hidden, mask)
    assert logits.shape == (2, 64, 64)
    ctx = model.prepare_context(low, hidden, mask)
    assert ctx.mask.shape == (2, 16 + 5)
    assert torch.allclose(model(tokens, context=ctx), logits, atol=1e-6)
    other_low = (low + 1) % 32
    assert not torch.allclose(model(tokens, other_low, hidden, mask), logits)


def test_bad_inputs():
    with pytest.raises(ValueError, match="exactly one"):
        MuseTransformerConfig(text_dim=None)
    model = MuseTransformer(tiny())
    hidden, mask = _text()
    with pytest.raises(ValueError, match="4x4"):
        model(torch.randint(0, 65, (2, 5, 5)), hidden, mask)
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(2, 16), hidden, mask)
    with pytest.raises(ValueError, match=r"\(B, L, 16\)"):
        model(torch.randint(0, 65, (2, 16)), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="text_hidden"):
        model(torch.randint(0, 65, (2, 16)))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    from musefast.models import load_component, save_component

    base = MuseTransformer(tiny()).eval()
    sr = SuperResTransformer(SuperResConfig(high=tiny(grid_size=8), low_codebook_size=32, low_grid_size=4,
                                            encoder_depth=1)).eval()
    for i, model in enumerate((base, sr)):
        save_component(model, tmp_path / str(i))
        loaded = load_component(tmp_path / str(i))
        assert type(loaded) is type(model) and loaded.config == model.config
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)
