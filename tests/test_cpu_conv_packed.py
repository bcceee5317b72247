"""Packed oneDNN convolutions in the VQ decoders (musefast.cpu.conv): the same images as the plain
NCHW path (its reference twin) within fp32 rounding, repacked when a weight changes, and the bf16
decode within the project's error rule (at most twice the error of PyTorch's own bf16 decode).

Tolerance for fp32: oneDNN's blocked kernels sum in another order than torch's NCHW path, so pixels
(in [0, 1]) differ by rounding only (observed ≤ 3e-5 on these models); a wrong layout, a dropped
bias or a skip added twice moves them by far more."""
import copy

import pytest
import torch

from musefast.cpu import conv as cpu_conv, isa, linear as cpu
from musefast.models.vqgan import VQGAN, VQGANConfig

pytestmark = pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and isa.effective()["path"] != "none"),
                                reason="no oneDNN convolutions here (torch without oneDNN, or below AVX2)")

CONFIGS = {
    # taming/diffusers topology: widths change inside levels (1x1 skip on the input), upsampling
    "input_skip": VQGANConfig(channels=32, channel_mult=(1, 2, 3), num_res_blocks=1, num_mid_blocks=1,
                              z_channels=24, embed_dim=8, codebook_size=64, norm_groups=8, signed_pixels=False),
    # google maskgit: the 1x1 skip reads the block's own output
    "output_skip": VQGANConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, num_mid_blocks=1, z_channels=16,
                               embed_dim=8, codebook_size=32, norm_groups=8, shortcut="output"),
    # the demo tokenizer's kind: no norms, space-to-depth patches
    "no_norm": VQGANConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, num_mid_blocks=1, z_channels=16,
                           embed_dim=8, codebook_size=32, norm_groups=8, norm="none", patch_size=2,
                           downsample="avgpool"),
}


def _vq(name):
    torch.manual_seed(0)
    vq = VQGAN(CONFIGS[name]).eval()
    with torch.no_grad():  # norms start at identity: give every parameter a value
        for p in vq.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vq


def _tokens(vq, b=2, h=3, w=5):
    return torch.randint(0, vq.config.codebook_size, (b, h, w), generator=torch.Generator().manual_seed(1))


def _packed_convs(vq):
    return [m for m in vq.modules() if cpu_conv.PACKED_ATTR in m.__dict__]


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_packed_decode_matches_plain(name):
    vq = _vq(name)
    tokens = _tokens(vq)
    want = vq.decode(tokens)
    cpu_conv.apply(vq)
    got = vq.decode(tokens)
    decoder_convs = [m for m in vq.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(_packed_convs(vq)) == len(decoder_convs) + 1  # every decoder conv and post_quant_conv ran packed
    assert got.is_contiguous() and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 3e-5
    with cpu.plain():  # the reference twin inside the applied model: torch's conv2d, same layout
        assert (vq.decode(tokens) - want).abs().max().item() < 3e-5
    cpu_conv.remove(vq)
    assert not _packed_convs(vq) and torch.equal(vq.decode(tokens), want)


@torch.no_grad()
def test_weight_change_repacks():
    vq = _vq("input_skip")
    tokens = _tokens(vq)
    cpu_conv.apply(vq)
    vq.decode(tokens)
    vq.decoder.conv_out.weight.mul_(-1)  # in place: the packed copy must not be reused
    vq.decoder.levels[0].blocks[0].conv2.bias.add_(0.5)  # the bias of a conv with the skip in its epilogue
    got = vq.decode(tokens)
    plain = copy.deepcopy(vq)
    cpu_conv.remove(plain)
    assert (got - plain.decode(tokens)).abs().max().item() < 3e-5


@pytest.mark.skipif(not isa.effective()["bf16_packs"], reason="oneDNN has no bf16 convolutions on this ISA")
@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_bf16_decode_within_error_rule(name):
    vq = _vq(name)
    tokens = _tokens(vq)
    want = vq.decode(tokens)
    torch_bf16 = copy.deepcopy(vq).to(torch.bfloat16)  # PyTorch computing the decoder in bf16
    torch_bf16.config = copy.copy(vq.config)
    object.__setattr__(torch_bf16.config, "force_upcast", False)
    ref_err = (torch_bf16.decode(tokens).float() - want).abs()
    cpu_conv.apply(vq, dtype=torch.bfloat16)
    got = vq.decode(tokens)
    assert got.dtype == torch.float32 and got.is_contiguous()
    err = (got - want).abs()
    assert err.max().item() > 0  # it did compute in bf16
    assert err.mean().item() <= 2 * ref_err.mean().item() + 1e-6
    assert err.max().item() <= 2 * ref_err.max().item() + 1e-5
    cpu_conv.apply(vq)  # back to float32
    assert (vq.decode(tokens) - want).abs().max().item() < 3e-5


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be None, torch.float32 or torch.bfloat16"):
        cpu_conv.apply(_vq("no_norm"), dtype=torch.float16)


@torch.no_grad()
def test_follow_auto_decodes_in_bf16_only_where_auto_picked_it():
    vq = _vq("input_skip")
    cpu_conv.follow_auto(vq, torch.bfloat16)  # not applied (MUSEFAST_CPU_ENGINE=0): left alone
    assert cpu_conv.decode_dtype(vq) == torch.float32
    cpu_conv.apply(vq)
    cpu_conv.follow_auto(vq, torch.float32)
    assert cpu_conv.decode_dtype(vq) == torch.float32
    cpu_conv.follow_auto(vq, torch.bfloat16)
    assert cpu_conv.decode_dtype(vq) == (torch.bfloat16 if isa.effective()["bf16"] else torch.float32)
    cpu_conv.remove(vq)
    assert cpu_conv.decode_dtype(vq) == torch.float32
