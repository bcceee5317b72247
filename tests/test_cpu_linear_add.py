"""The residual add in the epilogue of a packed linear (musefast.cpu.linear.linear_add) equals its
reference twin, residual + linear(x), and the blocks that call it (U-ViT's transformer layer and
ConvNeXt block, the Muse transformer's MLP) keep their outputs.

Tolerance: oneDNN adds the residual to the fp32 accumulator before rounding to the output dtype,
the twin after; in fp32 that is rounding (≤ 1e-5 relative here), in bf16 one output rounding (≤ 1
bf16 ulp of the larger term: 2⁻⁷ relative)."""
import pytest
import torch
from torch import nn

from musefast.cpu import isa, linear as cpu

pytestmark = pytest.mark.skipif(not cpu.enabled_by_default(), reason="the CPU engine does not run here")

DTYPES = [torch.float32] + ([torch.bfloat16] if isa.effective()["bf16_packs"] else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_linear_add_matches_twin(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(59, 97, bias=bias).to(dtype)
    x = torch.randn(3, 7, 59, dtype=dtype)
    residual = torch.randn(3, 7, 97, dtype=dtype)
    want = (residual.float() + nn.functional.linear(x.float(), lin.weight.float(),
                                                    None if lin.bias is None else lin.bias.float()))
    cpu.apply(lin, release=False)
    got = cpu.linear_add(lin, x, residual)
    with cpu.plain():
        twin = cpu.linear_add(lin, x, residual)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert got.dtype == dtype and got.shape == residual.shape
    scale = want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= tol * scale
    assert (twin.float() - want).abs().max().item() <= tol * scale
    assert not torch.equal(residual + cpu.linear(lin, x), residual)  # the residual is not the whole answer


@torch.no_grad()
def test_linear_add_falls_back_without_the_engine():
    lin = nn.Linear(8, 4)
    x, residual = torch.randn(2, 8), torch.randn(2, 4)
    assert torch.equal(cpu.linear_add(lin, x, residual), residual + lin(x))


@torch.no_grad()
def test_uvit_forward_keeps_its_output():
    from musefast.models.uvit import UVit2D, UVit2DConfig

    torch.manual_seed(0)
    cfg = UVit2DConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, in_channels=32,
                       block_out_channels=32, block_num_heads=2, num_res_blocks=1, intermediate_size=96,
                       cond_embed_dim=32, encoder_hidden_size=48, vocab_size=64, codebook_size=60, sample_size=4)
    model = UVit2D(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = torch.randint(0, 60, (2, 4, 4))
    text, pooled, micro = torch.randn(2, 5, 48), torch.randn(2, 32), torch.rand(2, 5)
    want = model(tokens, text, pooled, micro)
    cpu.apply(model)
    got = model(tokens, text, pooled, micro)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
