"""Channels-last VQ decoding on the CPU (musefast.cpu.conv) gives the plain NCHW path's
images as NCHW contiguous fp32, leaves encoding (tokens) bit-identical and the weights untouched.

Tolerance: channels-last oneDNN convolutions sum in another order than NCHW ones, so fp32 pixels
(in [0, 1]) differ by rounding only: within 2e-5 absolute (observed ≤ 2.4e-5 max, ~1e-6 mean at
larger widths; ~1e-6 on these models). A layout bug (a view over the wrong strides) moves pixels
by O(1)."""
import pytest
import torch

from musefast.cpu import conv as cpu_conv, linear as cpu
from musefast.models.serialization import load_component, save_component
from musefast.models.vqgan import VQGAN, VQGANConfig
from musefast.pipelines.loading import runnable

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

CONFIGS = {
    # taming/diffusers topology at aMUSEd's pixel range, odd widths per level
    "group": VQGANConfig(channels=32, channel_mult=(1, 2, 3), num_res_blocks=1, num_mid_blocks=1, z_channels=24,
                         embed_dim=8, codebook_size=64, norm_groups=8, signed_pixels=False),
    # the demo tokenizer's kind: space-to-depth patches, no norms, average-pool downsampling
    "patch": VQGANConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, num_mid_blocks=1, z_channels=16,
                         embed_dim=8, codebook_size=32, norm_groups=8, norm="none", patch_size=2,
                         downsample="avgpool"),
}


def _vq(name, seed=0):
    torch.manual_seed(seed)
    vq = VQGAN(CONFIGS[name]).eval()
    with torch.no_grad():  # norms start at identity: give every parameter a value
        for p in vq.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vq


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_channels_last_equals_plain(name):
    vq = _vq(name)
    f = vq.downsampling_factor
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vq.config.codebook_size, (2, 3, 5), generator=g)  # B = 2, non-square grid
    image = torch.rand(2, 3, 3 * f, 5 * f, generator=g)
    plain = vq.decode(tokens), vq.encode_features(image)
    assert cpu_conv.apply(vq) == 1 and cpu_conv.is_applied(vq)
    decoded = vq.decode(tokens)
    assert decoded.is_contiguous() and decoded.dtype == torch.float32  # the decoder contract: NCHW fp32
    assert 0 < (decoded - plain[0]).abs().max().item() < 2e-5  # > 0: the channels-last path did run
    assert torch.equal(vq.encode_features(image), plain[1])  # encoding (tokens) is never changed
    cpu_conv.remove(vq)
    assert not cpu_conv.is_applied(vq) and torch.equal(vq.decode(tokens), plain[0])


@torch.no_grad()
def test_half_module_decodes_in_float32_channels_last():
    vq = _vq("group")
    tokens = torch.randint(0, 64, (1, 2, 2))
    want = vq.decode(tokens)
    vq.to(torch.bfloat16)  # force_upcast: the decoder runs on float32 copies of its weights
    cpu_conv.apply(vq)
    got = vq.decode(tokens)
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    assert (got.float() - want).abs().max().item() < 2e-2  # bf16 weights and output rounding


@torch.no_grad()
def test_applied_at_load_and_weights_stay_ordinary(tmp_path, monkeypatch):
    vq = _vq("group")
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    save_component(vq, tmp_path / "vq")
    loaded = runnable(load_component(tmp_path / "vq"))
    assert cpu_conv.is_applied(loaded)  # the loader applies it on a CPU, as the linear engine
    loaded.decode(torch.zeros(1, 2, 2, dtype=torch.long))
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) and state[k].is_contiguous() for k, v in before.items())
    # the decoder's conv weights are stored channels-last while applied (no per-call reorder) ...
    convs = [m for m in loaded.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    save_component(loaded, tmp_path / "again")  # ... and an applied model saves ordinary tensors
    again = load_component(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], v) for k, v in before.items())
    cpu.remove(loaded)
    assert not cpu_conv.is_applied(loaded)
    assert all(c.weight.is_contiguous() for c in convs)
    monkeypatch.setenv("MUSEFAST_CPU_ENGINE", "0")
    assert not cpu_conv.is_applied(runnable(load_component(tmp_path / "vq")))
