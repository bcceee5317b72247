"""VQGAN: shapes at factors 8 and 16, tokens vs VectorQuantizer, fp32 decode, save/load, training."""
import json

import pytest
import torch

from musefast import ops
from musefast.models import VQGAN, VQGANConfig
from musefast.models.serialization import CONFIG_NAME

TINY = dict(channels=8, num_res_blocks=1, num_mid_blocks=1, z_channels=8, embed_dim=4, codebook_size=32,
            norm_groups=4)
MULTS = {8: (1, 2, 2, 2), 16: (1, 1, 2, 2, 2)}


def tiny(factor=8, **kw) -> VQGAN:
    return VQGAN(VQGANConfig(**{**TINY, "channel_mult": MULTS[factor], **kw})).eval()


@pytest.mark.parametrize("factor", [8, 16])
@pytest.mark.parametrize("downsample", ["conv", "avgpool"])
def test_shapes_and_round_trip(factor, downsample):
    model = tiny(factor, downsample=downsample)
    assert model.downsampling_factor == factor
    image = torch.rand(2, 3, 2 * factor, 3 * factor)
    tokens = model.encode(image)
    assert tokens.shape == (2, 2, 3) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 32
    recon = model.decode(tokens)
    assert recon.shape == image.shape and recon.dtype == torch.float32
    assert 0 <= float(recon.min()) and float(recon.max()) <= 1
    train_recon, indices, vq_loss = model(image)
    assert train_recon.shape == image.shape
    assert torch.equal(indices, tokens)
    assert vq_loss.dim() == 0 and torch.isfinite(vq_loss)
    # decode is the clamped training reconstruction of the same tokens
    torch.testing.assert_close(recon, train_recon.clamp(0, 1))


def test_no_attention_blocks():
    names = {type(m).__name__ for m in tiny(16).modules()}
    assert not any("Attention" in n for n in names)
    assert {"Conv2d", "GroupNorm", "ResBlock", "Downsample", "Upsample"} <= names


@pytest.mark.parametrize("signed_pixels", [True, False])
def test_tokens_equal_vector_quantizer_on_encoder_features(signed_pixels):
    model = tiny(8, signed_pixels=signed_pixels)
    image = torch.rand(3, 3, 24, 16)
    x = image * 2 - 1 if signed_pixels else image
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x))
        expected = ops.vq_nearest(z.permute(0, 2, 3, 1), model.quantize.codebook, backend="reference")
        tokens = model.encode(image)
        assert torch.equal(tokens, expected)
        assert torch.equal(tokens, model.quantize.encode(z))
        # decode = decoder(post_quant_conv(codebook rows)), mapped back to [0, 1]
        z_q = model.quantize.codebook[tokens].permute(0, 3, 1, 2)
        out = model.decoder(model.post_quant_conv(z_q))
        out = (out + 1) / 2 if signed_pixels else out
    torch.testing.assert_close(model.decode(tokens), out.clamp(0, 1))


def test_bad_inputs_raise():
    model = tiny(8)
    with pytest.raises(ValueError, match="multiple of the VQ downsampling factor 8"):
        model.encode(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match="multiple of the VQ downsampling factor 8"):
        model(torch.rand(1, 3, 16, 12))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model.encode(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        model.encode(torch.rand(3, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        model.encode(torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(torch.rand(1, 3, 16, 16) * 2 - 1)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 32\)"):
        model.decode(torch.full((1, 2, 2), 32))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode(torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="int64 or int32"):
        model.decode(torch.zeros(1, 2, 2))


def test_config_validation():
    with pytest.raises(ValueError, match="norm_groups"):
        VQGANConfig(**{**TINY, "norm_groups": 3})
    with pytest.raises(ValueError, match="downsample"):
        VQGANConfig(**{**TINY, "downsample": "maxpool"})
    with pytest.raises(ValueError, match="channel_mult"):
        VQGANConfig(**{**TINY, "channel_mult": ()})
    assert VQGANConfig(channel_mult=[1, 2, 4]).channel_mult == (1, 2, 4)


def _overflowing_fp32_model(force_upcast: bool) -> VQGAN:
    """A decoder whose first activations exceed float16's range (65504) but not float32's."""
    model = tiny(8, force_upcast=force_upcast)
    with torch.no_grad():
        model.quantize.embedding.weight.mul_(32 * 1000)  # codes ~ +-1000 (representable in fp16)
        model.decoder.conv_in.weight.mul_(1000)          # weights ~ +-100, activations ~ 1e5
    return model


def test_fp32_decode_of_half_model():
    tokens = torch.randint(0, 32, (2, 2, 2))
    fp32 = _overflowing_fp32_model(force_upcast=True)
    expected = fp32.decode(tokens)
    assert torch.isfinite(expected).all()

    plain_half = _overflowing_fp32_model(force_upcast=False).half()
    plain_half.load_state_dict(fp32.state_dict())
    assert torch.isnan(plain_half.decode(tokens)).any()  # the failure force_upcast exists for

    upcast_half = _overflowing_fp32_model(force_upcast=True).half()
    upcast_half.load_state_dict(fp32.state_dict())
    seen = []
    upcast_half.decoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    out = upcast_half.decode(tokens)
    assert seen == [torch.float32]
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert all(p.dtype == torch.float16 for p in upcast_half.parameters())  # module left as is
    # float32 compute on fp16-rounded weights: only weight rounding and the final cast differ
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=0)

    image = torch.rand(2, 3, 16, 16)
    assert upcast_half.encode(image).shape == (2, 2, 2)


def test_save_load_bit_exact(tmp_path):
    model = tiny(16, downsample="avgpool", signed_pixels=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differ from any fresh init
    folder = model.save_pretrained(tmp_path / "vq")
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert saved["_class"] == "VQGAN" and "_musefast_version" in saved and saved["channel_mult"] == [1, 1, 2, 2, 2]
    loaded = VQGAN.from_pretrained(folder)
    assert loaded.config == model.config and not loaded.training  # a reader returns the plain module
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    image = torch.rand(1, 3, 32, 16)
    tokens = model.encode(image)
    assert torch.equal(loaded.encode(image), tokens)
    assert torch.equal(loaded.decode(tokens), model.decode(tokens))

    half = VQGAN.from_pretrained(folder, dtype=torch.float16)
    half.save_pretrained(tmp_path / "vq16")
    again = VQGAN.from_pretrained(tmp_path / "vq16", dtype=torch.float16)
    assert all(torch.equal(a, b) and a.dtype == torch.float16
               for a, b in zip(half.state_dict().values(), again.state_dict().values()))


def test_load_mismatch_names_file_and_keys(tmp_path):
    folder = tiny(8).save_pretrained(tmp_path / "vq")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "codebook_size": 64, "num_mid_blocks": 2}))
    with pytest.raises(ValueError) as err:
        VQGAN.from_pretrained(folder)
    msg = str(err.value)
    assert "model.safetensors" in msg and "quantize.embedding.weight" in msg
    assert "missing" in msg and "shape mismatch" in msg and "encoder.mid.1.conv1.weight" in msg
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "num_heads": 4}))
    with pytest.raises(ValueError, match="unknown VQGANConfig field"):
        VQGAN.from_pretrained(folder)


def test_training_smoke_loss_decreases():
    model = tiny(8).train()
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=16, mode="bilinear")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        recon, _, vq_loss = model(images)
        loss = (recon - images).pow(2).mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        if not losses:  # straight-through: the reconstruction loss reaches the encoder
            assert model.encoder.conv_in.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


@pytest.mark.parametrize("patch_size,mult", [(8, (1,)), (4, (1, 2)), (2, (1, 2, 2))])
def test_patch_size_folds_pixels_into_channels(patch_size, mult):
    """patch_size p: levels run at 1/p resolution, the factor is p * 2**(levels-1), and the
    decoder draws every pixel of a patch from its own output channel (PixelShuffle)."""
    model = VQGAN(VQGANConfig(**{**TINY, "channel_mult": mult, "patch_size": patch_size})).eval()
    assert model.downsampling_factor == 8
    image = torch.rand(2, 3, 16, 24)
    tokens = model.encode(image)
    assert tokens.shape == (2, 2, 3)
    assert model.decode(tokens).shape == image.shape
    assert model.encoder.conv_in.in_channels == 3 * patch_size ** 2
    assert model.decoder.conv_out.out_channels == 3 * patch_size ** 2
    # space-to-depth: a change inside one patch of the input moves only that patch's
    # encoder input channels; depth-to-space: one decoder output channel is one pixel.
    folded = model.encoder.fold(image)
    assert folded.shape == (2, 3 * patch_size ** 2, 16 // patch_size, 24 // patch_size)
    assert torch.equal(model.decoder.unfold(folded), image)


def test_norm_none_has_no_normalisation_layers_and_matches_groupnorm_keys_otherwise():
    plain = tiny(8, norm="none")
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in plain.modules())
    grouped_keys = set(tiny(8).state_dict())
    plain_keys = set(plain.state_dict())
    assert plain_keys < grouped_keys and all("norm" in k for k in grouped_keys - plain_keys)
    image = torch.rand(1, 3, 16, 16)
    assert plain.decode(plain.encode(image)).shape == image.shape
    with pytest.raises(ValueError, match="norm"):
        VQGANConfig(**{**TINY, "norm": "batch"})
    with pytest.raises(ValueError, match="patch_size"):
        VQGANConfig(**{**TINY, "patch_size": 0})


def test_patch_and_norm_options_survive_save_load(tmp_path):
    model = VQGAN(VQGANConfig(**{**TINY, "channel_mult": (1,), "patch_size": 8, "norm": "none"})).eval()
    model.save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path)
    assert loaded.config == model.config
    image = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.encode(image), model.encode(image))
