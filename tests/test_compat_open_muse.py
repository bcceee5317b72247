"""Parity with huggingface/open-muse's ``MaskGitTransformer`` from committed fixtures.

open-muse is not on PyPI, so its logits were computed once, offline, and committed:
``tests/fixtures/open_muse/<variant>/`` holds what open-muse's ``save_pretrained`` writes
(``config.json`` + ``pytorch_model.safetensors`` or ``pytorch_model.bin``) and ``io.safetensors``
(``input_ids`` in open-muse's ids, ``encoder_hidden_states`` or ``class_ids``, and the model's
full output ``logits`` in fp32). How they were made: open-muse at commit
64e1afe033717d795866ab8204484705cd4dc3f7 (``muse/modeling_transformer.py`` and the modules it
imports, run from a checkout with torch 2.14.1, einops and accelerate); for each variant
``torch.manual_seed(1234 + i)``, ``MaskGitTransformer(hidden_size=32, num_hidden_layers=2,
num_attention_heads=4, intermediate_size=48, codebook_size=16, num_vq_tokens=16, dropouts 0,
**variant)`` in eval mode, every norm parameter perturbed by N(0, 0.2) and every Linear bias
drawn from N(0, 0.05) (the init would leave norms at 1/0 and biases at 0, hiding mapping
errors); ids uniform over the codebook with half of them set to the [MASK] id (vocab_size − 1),
batch 2, text length 5. Variants:

* ``maskgit_text_rmsnorm``: cc12m.yaml-like — rmsnorm, no normformer, unprojected text (K/V
  read the 24-wide text), MLM head, logits over the codebook, padded vocabulary (mask id 23).
* ``maskgit_text_layernorm``: LayerNorm with biases (``use_bias``), normformer, projected text
  (encoder_proj + LN), no final norm, a plain ``to_logits`` over the whole vocabulary; weights
  as ``pytorch_model.bin``.
* ``maskgit_class``: imagenet.yaml-like class-conditional — class ids inside the vocabulary,
  class token prepended at position 0.

Tolerance: fp32 against fp32 (flash-attn's rule: the error of a same-dtype recomputation, ~1e-7 here,
times 2 plus a small eps).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from musefast.compat import open_muse as om
from musefast.compat._convert import ConversionError
from musefast.models.serialization import load_component, save_component
from musefast.models.transformer import MuseTransformer
from musefast.models.uvit import UVit2D
from musefast.models.vqgan import VQGAN

FIXTURES = Path(__file__).parent / "fixtures" / "open_muse"
VARIANTS = ("maskgit_text_rmsnorm", "maskgit_text_layernorm", "maskgit_class")


def _case(name):
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    return folder, config, load_file(folder / "io.safetensors")


def _logits(model, io, config):
    ids = om.to_musefast_ids(io["input_ids"], config)
    if "class_ids" in io:
        return model(ids, class_labels=io["class_ids"])
    return model(ids, io["encoder_hidden_states"])


def _expected(io, config):
    want = io["logits"][..., : config["codebook_size"]]
    return want[:, 1:] if "class_ids" in io else want  # drop the class token's row


@pytest.mark.parametrize("backend", ["reference", None])
@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_open_muse(name, backend):
    folder, config, io = _case(name)
    model = om.load_transformer(folder, backend=backend)
    with torch.no_grad():
        got = _logits(model, io, config)
    torch.testing.assert_close(got, _expected(io, config), rtol=1e-5, atol=1e-5)


def test_prepared_context_and_saved_model_give_the_same_logits(tmp_path):
    folder, config, io = _case("maskgit_text_rmsnorm")
    model = om.load_transformer(folder, backend="reference")
    ids = om.to_musefast_ids(io["input_ids"], config)
    with torch.no_grad():
        want = model(ids, io["encoder_hidden_states"])
        ctx = model.prepare_context(io["encoder_hidden_states"])
        torch.testing.assert_close(model(ids, context=ctx), want)
        save_component(model, tmp_path / "m")  # the new config fields round-trip
        again = load_component(tmp_path / "m")
        torch.testing.assert_close(again(ids, io["encoder_hidden_states"]), want)


def test_ids_map_the_open_muse_mask_id():
    _, config, _ = _case("maskgit_text_rmsnorm")  # codebook 16, vocab 24: mask id 23
    ids = torch.tensor([[0, 15, 23]])
    assert om.to_musefast_ids(ids, config).tolist() == [[0, 15, 16]]
    with pytest.raises(ValueError, match="codebook ids"):
        om.to_musefast_ids(torch.tensor([[17]]), config)


def test_unknown_missing_and_mismatched_keys_are_listed():
    folder, config, _ = _case("maskgit_text_rmsnorm")
    state, _ = om.read_folder(folder)
    extra = dict(state, **{"transformer_layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"unknown keys \(1\): transformer_layers\.0\.extra\.weight"):
        om.convert_transformer(extra, config)
    missing = {k: v for k, v in state.items() if k != "transformer_layers.1.ffn.wo.weight"}
    with pytest.raises(ConversionError, match="missing key 'transformer_layers.1.ffn.wo.weight'"):
        om.convert_transformer(missing, config)
    wrong = dict(state, **{"transformer_layers.1.ffn.wo.weight": torch.zeros(32, 40)})
    with pytest.raises(ConversionError, match=r"blocks\.1\.mlp\.proj_out\.weight: checkpoint \(32, 40\) vs model \(32, 48\)"):
        om.convert_transformer(wrong, config)
    with pytest.raises(ConversionError, match="shape mismatches"):  # config and weights disagree
        om.convert_transformer(state, dict(config, hidden_size=64))


@pytest.mark.parametrize("change, message", [
    ({"use_conv_in_out": True}, "use_conv_in_out"),
    ({"add_cross_attention": False}, "unconditional"),
    ({"vocab_size": 16}, "no \\[MASK\\] id"),
    ({"_class_name": "MaskGiTUViT"}, "MaskGitTransformer"),
])
def test_unsupported_configs_raise(change, message):
    folder, config, _ = _case("maskgit_text_rmsnorm")
    state, _ = om.read_folder(folder)
    with pytest.raises(ValueError, match=message):
        om.convert_transformer(state, {**config, **change})


def test_folder_without_weights_raises(tmp_path):
    shutil.copy(FIXTURES / "maskgit_class" / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weight file"):
        om.load_transformer(tmp_path)


# -- MaskGitVQGAN and VQGANModel --------------------------------------------------------------
# Fixture ``maskgit_vqgan``: the same open-muse commit, ``torch.manual_seed(4321)``,
# ``MaskGitVQGAN(resolution=16, hidden_channels=32, channel_mult=(1, 2), num_res_blocks=1,
# z_channels=16, num_embeddings=24, quantized_embed_dim=16)``, norms perturbed and biases drawn as
# above, the codebook drawn from N(0, 1), then every parameter rounded to a multiple of 1/256 and
# stored as fp16 (a small fixture; the outputs were computed from those values in fp32).
# ``io.safetensors``: ``pixel_values`` U[0, 1) (2, 3, 16, 16), the encoder's ``features``,
# ``tokens`` (B, 64) of ``encode``, the codebook ``distances`` and ``decoded = decode_code(tokens)``.
# Fixture ``taming_vqgan``: likewise with ``torch.manual_seed(2468)``, the taming
# ``VQGANModel(resolution=16, hidden_channels=32, channel_mult=(1, 1), num_res_blocks=1,
# attn_resolutions=(), no_attn_mid_block=True, z_channels=8, num_embeddings=24,
# quantized_embed_dim=4)`` (convolutional, as the aMUSEd VQ), codebook from N(0, 0.5);
# its ``features`` are after ``quant_conv``.


@pytest.mark.parametrize("name", ["maskgit_vqgan", "taming_vqgan"])
def test_vqgan_tokens_features_and_reconstructions_match(name):
    folder = FIXTURES / name
    io = load_file(folder / "io.safetensors")
    vq = om.load_vqgan(folder)
    with torch.no_grad():
        torch.testing.assert_close(vq.encode_features(io["pixel_values"]), io["features"], rtol=1e-5, atol=1e-5)
        tokens = vq.encode(io["pixel_values"]).flatten(1)
        differ = tokens != io["tokens"]
        if differ.any():  # only legal at near-ties of the open-muse distances
            d = io["distances"]
            ours = d.gather(1, tokens.reshape(-1, 1))[:, 0]
            theirs = d.gather(1, io["tokens"].reshape(-1, 1))[:, 0]
            assert (ours - theirs).abs().max() < 1e-4
        assert differ.sum() <= 1
        grid = io["tokens"].view(2, 8, 8)
        torch.testing.assert_close(vq.decode_features(vq.quantize.lookup(grid)), io["decoded"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vq.decode(grid), io["decoded"].clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_vqgan_unknown_keys_and_bad_configs_raise():
    folder = FIXTURES / "maskgit_vqgan"
    state, config = om.read_folder(folder)
    with pytest.raises(ConversionError, match=r"unknown keys \(1\): encoder\.down\.0\.attn\.weight"):
        om.convert_vqgan(dict(state, **{"encoder.down.0.attn.weight": torch.zeros(1)}), config)
    with pytest.raises(ConversionError, match="shape mismatches"):
        om.convert_vqgan(state, dict(config, num_embeddings=32))
    with pytest.raises(ValueError, match="quantized_embed_dim"):
        om.convert_vqgan(state, dict(config, quantized_embed_dim=8))
    with pytest.raises(ConversionError, match=r"unknown keys \(2\): post_quant_conv\.weight, quant_conv\.weight"):
        extra = {"quant_conv.weight": torch.zeros(16, 16, 1, 1), "post_quant_conv.weight": torch.zeros(16, 16, 1, 1)}
        om.convert_vqgan(dict(state, **extra), config)
    with pytest.raises(ValueError, match="MaskGitVQGAN or VQGANModel config"):
        om.convert_vqgan(state, dict(config, _class_name="MOVQ"))
    taming, taming_config = om.read_folder(FIXTURES / "taming_vqgan")
    with pytest.raises(ValueError, match=r"attention at resolutions \[8\]"):
        om.convert_vqgan(taming, dict(taming_config, attn_resolutions=[8]))
    with pytest.raises(ValueError, match="no_attn_mid_block=False"):
        om.convert_vqgan(taming, dict(taming_config, no_attn_mid_block=False))
    with pytest.raises(ValueError, match="resample_with_conv=False"):
        om.convert_vqgan(taming, dict(taming_config, resample_with_conv=False))
    with pytest.raises(ValueError, match=r"channel_mult\[0\] != 1"):
        om.convert_vqgan(taming, dict(taming_config, channel_mult=[2, 1]))


# -- MaskGiTUViT_v2 ----------------------------------------------------------------------------
# Fixture ``uvit_v2``: the same open-muse commit, ``torch.manual_seed(999)``,
# ``MaskGiTUViT_v2(hidden_size=32, use_bias=True, cond_embed_dim=16, micro_cond_encode_dim=4,
# micro_cond_embed_dim=20, encoder_hidden_size=24, vocab_size=24, codebook_size=16, in_channels=8,
# block_out_channels=[16], num_res_blocks=2, force_down_up_sample=True, block_num_heads=2,
# num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, norm_type="rmsnorm")``, every
# parameter plus N(0, 0.05) noise (N(0, 0.2) for norms: its init zeroes the AdaLN mappers, the GRN
# and the first MLM conv). ``io.safetensors``: ``input_ids`` (2, 16) (half [MASK] = 23),
# ``encoder_hidden_states`` (2, 5, 24), ``cond_embeds`` (2, 16), ``micro_conds`` (2, 5), ``logits``.


@pytest.mark.parametrize("backend", ["reference", None])
def test_uvit_v2_logits_match_open_muse(backend):
    folder = FIXTURES / "uvit_v2"
    io = load_file(folder / "io.safetensors")
    model = om.load_uvit(folder, backend=backend)
    ids = io["input_ids"].view(2, 4, 4)
    cond = (io["encoder_hidden_states"], io["cond_embeds"], io["micro_conds"])
    with torch.no_grad():
        got = model(ids, *cond)
        torch.testing.assert_close(got.reshape(2, 16, -1), io["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids, context=model.prepare_context(*cond)), got)


def test_uvit_v2_unknown_keys_and_unsupported_configs_raise():
    folder = FIXTURES / "uvit_v2"
    state, config = om.read_folder(folder)
    with pytest.raises(ConversionError, match=r"unknown keys \(1\): transformer_layers\.0\.extra"):
        om.convert_uvit(dict(state, **{"transformer_layers.0.extra": torch.zeros(1)}), config)
    with pytest.raises(ConversionError, match="shape mismatches"):
        om.convert_uvit(state, dict(config, intermediate_size=48))
    with pytest.raises(ValueError, match="norm_type='layernorm'.*use_fused_mlp"):
        om.convert_uvit(state, dict(config, norm_type="layernorm", use_fused_mlp=True))


@pytest.mark.parametrize("name, cls", [("maskgit_class", MuseTransformer), ("uvit_v2", UVit2D),
                                       ("maskgit_vqgan", VQGAN), ("taming_vqgan", VQGAN)])
def test_load_picks_the_converter_by_class_name(name, cls):
    assert type(om.load(FIXTURES / name)) is cls


def test_load_rejects_other_open_muse_classes(tmp_path):
    for name in ("config.json", "pytorch_model.safetensors"):
        shutil.copy(FIXTURES / "maskgit_vqgan" / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, _class_name="PaellaVQModel")))
    with pytest.raises(ValueError, match="unsupported open-muse model _class_name='PaellaVQModel'"):
        om.load(tmp_path)
