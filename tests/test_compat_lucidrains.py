"""Parity with lucidrains' muse-maskgit-pytorch (a test extra, in its own environment: see
scripts/ci_peer_lucidrains.sh). Tiny random models built offline; no hub access: the peer's
T5 registry is pre-filled with a tiny T5 config (only its width is read when text
embeddings are passed directly), and torchvision is stubbed when it cannot be imported."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch

from musefast.compat import lucidrains as lc
from musefast.compat._convert import ConversionError

TINY_T5 = "musefast-offline-tiny-t5"
TEXT_DIM = 24


def _stub_torchvision() -> list[str]:
    """Minimal torchvision modules so the peer imports (it uses torchvision only for training
    data and the VGG loss, never in the code under test). Returns the names inserted."""
    names = ["torchvision", "torchvision.transforms", "torchvision.datasets", "torchvision.utils", "torchvision.models"]
    for name in names:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = mod
    sys.modules["torchvision.datasets"].ImageFolder = object
    sys.modules["torchvision.utils"].make_grid = sys.modules["torchvision.utils"].save_image = None
    for sub in ("transforms", "datasets", "utils", "models"):
        setattr(sys.modules["torchvision"], sub, sys.modules[f"torchvision.{sub}"])
    return names


def _import_peer():
    if importlib.util.find_spec("muse_maskgit_pytorch") is None:
        pytest.skip("muse-maskgit-pytorch is not installed (run scripts/ci_peer_lucidrains.sh)", allow_module_level=True)
    stubbed = []
    try:
        import torchvision  # noqa: F401
    except Exception:
        stubbed = _stub_torchvision()
    try:
        import muse_maskgit_pytorch as peer
        from muse_maskgit_pytorch import t5
        from transformers import T5Config
    finally:
        for name in stubbed:  # the peer keeps its references; other tests see no stub
            sys.modules.pop(name, None)
    t5.T5_CONFIGS.setdefault(TINY_T5, {"config": T5Config(d_model=TEXT_DIM, num_layers=1, num_heads=2, d_kv=8,
                                                          d_ff=32, vocab_size=64)})
    return peer


peer = _import_peer()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter and buffer that defaults to 0/1 (LayerNorm gamma
    and the buffer beta, q/k scales), so a dropped or swapped weight shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.dtype.is_floating_point and name.endswith(("gamma", "beta", "q_scale", "k_scale")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (0.0 if name.endswith("beta") else 1.0))


def _transformer(seed=0, *, dim=32, num_tokens=64, seq_len=16, depth=2, **kw):
    torch.manual_seed(seed)
    kw.setdefault("dim_head", 8)
    kw.setdefault("heads", 4)
    t = peer.MaskGitTransformer(num_tokens=num_tokens, seq_len=seq_len, dim=dim, depth=depth, t5_name=TINY_T5, **kw)
    _randomize(t, seed)
    return t.eval()


def _text(batch, length, dim=TEXT_DIM, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, dim, generator=g)
    for b in range(batch):  # the peer's T5 wrapper zeroes padding rows; vary the padding
        emb[b, length - b:] = 0.0
    return emb


def _tokens(model_cfg, batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, model_cfg.codebook_size, (batch, model_cfg.seq_len), generator=g)
    tok[torch.rand(tok.shape, generator=g) < 0.5] = model_cfg.mask_token_id
    return tok


def _assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flash", [True, False])
def test_base_logits_text_and_null_branch(flash):
    ref = _transformer(flash=flash)
    ours = lc.convert_transformer(ref)
    text = _text(3, 7)
    tok = _tokens(ours.config, 3)
    with torch.no_grad():
        want = ref(tok, text_embeds=text, cond_drop_prob=0.0)
        got = ours(tok, text, lc.text_mask(text))
        _assert_close(got, want)
        want_null = ref(tok, text_embeds=text, cond_drop_prob=1.0)
        got_null = ours(tok, text, lc.null_text_mask(text))
        _assert_close(got_null, want_null)
        assert (want_null - want).abs().max() > 1e-2  # the two branches really differ
        want_cfg = ref.forward_with_cond_scale(tok, text_embeds=text, cond_scale=3.0)
        _assert_close(got_null + 3.0 * (got - got_null), want_cfg)


def test_identity_text_projection_and_state_dict_with_kwargs():
    kw = dict(num_tokens=64, seq_len=16, dim=TEXT_DIM, depth=1, dim_head=6, heads=2, ff_mult=2)
    ref = _transformer(seed=3, **kw)
    assert isinstance(ref.text_embed_proj, torch.nn.Identity)
    ours = lc.convert_transformer(ref.state_dict(), **kw)
    text, tok = _text(2, 5), _tokens(ours.config, 2)
    with torch.no_grad():
        _assert_close(ours(tok, text, lc.text_mask(text)), ref(tok, text_embeds=text))
        # a prepared context (reused over decoding steps) gives the same logits
        ctx = ours.prepare_context(text, lc.text_mask(text))
        _assert_close(ours(tok, context=ctx), ref(tok, text_embeds=text))


def test_maskgit_state_dict_prefix():
    ref = _transformer(seed=4)
    state = {f"transformer.{k}": v for k, v in ref.state_dict().items()}
    ours = lc.convert_transformer(state)
    text, tok = _text(2, 4), _tokens(ours.config, 2)
    with torch.no_grad():
        _assert_close(ours(tok, text, lc.text_mask(text)), ref(tok, text_embeds=text))


def test_conversion_errors_list_keys_and_shapes():
    ref = _transformer(seed=5, depth=1)
    state = dict(ref.state_dict())
    state["transformer_blocks.layers.0.0.mystery"] = torch.zeros(3)
    state["bogus.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match=r"unknown keys \(2\).*bogus\.weight.*mystery"):
        lc.convert_transformer(state)
    with pytest.raises(ConversionError, match="heads=8"):
        lc.convert_transformer(ref.state_dict(), heads=8)
    bad = dict(ref.state_dict())
    bad["transformer_blocks.layers.0.1.to_out.weight"] = torch.zeros(32, 5)
    with pytest.raises(ConversionError, match=r"shape mismatches.*cross_attn\.to_out\.weight"):
        lc.convert_transformer(bad)
    missing = dict(ref.state_dict())
    del missing["transformer_blocks.layers.0.2.3.gamma"]
    with pytest.raises(ConversionError, match="layers.0.2.3.gamma"):
        lc.convert_transformer(missing)
    with pytest.raises(ValueError, match="self_cond"):
        lc.convert_transformer(ref.state_dict(), self_cond=True)


def _vae(seed=0, codebook_size=64):
    torch.manual_seed(seed)
    return peer.VQGanVAE(dim=16, layers=2, codebook_size=codebook_size, use_vgg_and_gan=False).eval()


def test_superres_logits_text_and_null_branch():
    vae = _vae()
    high = _transformer(seed=6, seq_len=64)  # 32 px / 4 = 8x8 high-res tokens
    maskgit = peer.MaskGit(image_size=32, transformer=high, vae=vae, cond_vae=vae, cond_image_size=16).eval()
    ours = lc.convert_maskgit(maskgit)
    assert ours.config.low_grid_size == 4 and ours.config.high.grid_size == 8
    text = _text(2, 6)
    tok = _tokens(ours.config.high, 2)
    low = torch.randint(0, 64, (2, 4, 4), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for drop, mask in ((0.0, lc.text_mask(text)), (1.0, lc.null_text_mask(text))):
            want = maskgit.transformer(tok, text_embeds=text, conditioning_token_ids=low, cond_drop_prob=drop)
            _assert_close(ours(tok, low, text, mask), want)
        # the low-res tokens matter: other ids, other logits
        other = ours(tok, (low + 1) % 64, text, lc.text_mask(text))
        assert (other - ours(tok, low, text, lc.text_mask(text))).abs().max() > 1e-3


def test_base_maskgit_object():
    vae = _vae(seed=1)
    maskgit = peer.MaskGit(image_size=16, transformer=_transformer(seed=8), vae=vae).eval()
    ours = lc.convert_maskgit(maskgit)
    assert ours.config.grid_size == 4
    text, tok = _text(2, 3), _tokens(ours.config, 2)
    with torch.no_grad():
        _assert_close(ours(tok, text, lc.text_mask(text)), maskgit.transformer(tok, text_embeds=text))


@pytest.mark.parametrize("kw", [
    dict(dim=16, layers=2, codebook_size=64),  # LFQ with projections (feature width 32 != 6 bits)
    dict(dim=16, layers=1, codebook_size=2**16, encdec_num_resnet_blocks=2),  # 16 bits = width: no projections
    dict(dim=16, layers=2, codebook_size=256, encdec_num_resnet_blocks=(1, 1), lfq_kwargs=dict(codebook_scale=0.5)),
])
def test_lfq_vae_tokens_and_decode(kw):
    torch.manual_seed(9)
    ref = peer.VQGanVAE(use_vgg_and_gan=False, **kw).eval()
    _randomize(ref, 9)
    ours = lc.convert_vae(ref)
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        _, want_ids, _ = ref.encode(img)
        got_ids = ours.encode(img)
        assert torch.equal(got_ids, want_ids)
        assert got_ids.unique().numel() > 1  # not a degenerate all-one-code encoder
        want_img = ref.decode_from_ids(want_ids)
        torch.testing.assert_close(ours.decode_features(ours.quantizer.lookup(got_ids)), want_img,
                                   rtol=1e-5, atol=1e-5)
    # the state-dict route with the constructor kwargs gives the same model
    extra = {"lfq_kwargs": kw["lfq_kwargs"]} if "lfq_kwargs" in kw else {}
    again = lc.convert_vae(ref.state_dict(), **extra)
    assert again.config == ours.config
    assert torch.equal(again.encode(img), want_ids)


def test_lfq_vae_with_gan_keys_and_errors():
    torch.manual_seed(11)
    ref = peer.VQGanVAE(dim=16, layers=2, codebook_size=64, use_vgg_and_gan=True, vgg=torch.nn.Identity()).eval()
    ours = lc.convert_vae(ref.state_dict())  # discriminator weights are dropped
    img = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(ours.encode(img), ref.encode(img)[1])
    state = dict(ref.state_dict())
    state["enc_dec.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="enc_dec.extra.weight"):
        lc.convert_vae(state)
    with pytest.raises(ConversionError, match="codebook_size=128"):
        lc.convert_vae(ref.state_dict(), codebook_size=128)


def test_lucidrains_preset_reproduces_generate_at_zero_temperature():
    """With temperature 0 the peer's sampler is deterministic (argmax at every step, confidence
    1 − p without noise): the musefast ``lucidrains`` preset over the converted model must give
    the same tokens, CFG included."""
    from musefast.sampling import MaskGitSampler

    vae = _vae(seed=12)
    maskgit = peer.MaskGit(image_size=16, transformer=_transformer(seed=13), vae=vae).eval()
    maskgit.vae.decode_from_ids = lambda ids: ids  # generate() then returns the token ids
    text = _text(2, 5, seed=14)
    maskgit.transformer.encode_text = lambda texts: text  # no T5: fixed embeddings
    want = maskgit.generate(["a", "b"], fmap_size=4, temperature=0.0, timesteps=6, cond_scale=3.0)

    ours = lc.convert_maskgit(maskgit)
    cond = ours.prepare_context(text, lc.text_mask(text))
    uncond = ours.prepare_context(text, lc.null_text_mask(text))
    sampler = MaskGitSampler(lc.PRESET, num_steps=6, temperature=0.0, progress=False, backend="reference")
    start = torch.full((2, 4, 4), ours.mask_token_id)
    got = sampler(lambda t: (ours(t, context=cond), ours(t, context=uncond)), start, mask_token_id=ours.mask_token_id)
    assert torch.equal(got, want)
