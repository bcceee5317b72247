"""UVit2D's one-pass elementwise forms against their plain definitions: AdaNorm with the norm's
affine folded into the per-generation modulation, the addcmul modulation, and the ConvNeXt GRN as
x·(1 + gamma·n) + beta. fp32 within 1e-5 relative; bf16 within twice the plain bf16 error."""
import pytest
import torch
import torch.nn.functional as F

from musefast.models.uvit import AdaNorm, GlobalResponseNorm, UVit2DConfig


def _plain_adanorm(m: AdaNorm, x, cond):
    scale, shift = m.linear(F.silu(cond)).chunk(2, dim=1)
    return m.norm(x) * (1 + scale)[:, None] + shift[:, None]


def _plain_grn(m: GlobalResponseNorm, x):
    gx = torch.linalg.vector_norm(x.float(), dim=(1, 2), keepdim=True)
    nx = (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
    return m.gamma * (x * nx) + m.beta + x


def _check(fast, plain, exact, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    else:
        err = float((fast.float() - exact.float()).abs().max())
        base = float((plain.float() - exact.float()).abs().max())
        assert err <= 2 * base + 1e-3, f"bf16 error {err:.3g} > 2 x {base:.3g}"


def _randomise(m, g):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adanorm_folded_affine_matches_plain(kind, dtype):
    g = torch.Generator().manual_seed(5)
    cfg = UVit2DConfig(hidden_size=48, use_bias=True)
    m = AdaNorm(40, cfg, kind).eval()
    _randomise(m, g)
    x, cond = torch.randn(3, 17, 40, generator=g) * 2 + 0.5, torch.randn(3, 48, generator=g)
    with torch.no_grad():
        exact = _plain_adanorm(m.double(), x.double(), cond.double())
        m.to(dtype)
        fast = m(x.to(dtype), m.modulation(cond.to(dtype)))
        plain = _plain_adanorm(m, x.to(dtype), cond.to(dtype))
    assert fast.dtype == dtype and fast.shape == x.shape
    _check(fast, plain, exact, dtype)
    if kind == "layernorm":  # the bias really is folded in (a fold that dropped it would fail)
        assert m.norm.bias is not None and float(m.norm.bias.detach().abs().max()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grn_one_pass_matches_plain(dtype):
    g = torch.Generator().manual_seed(6)
    m = GlobalResponseNorm(24)
    _randomise(m, g)
    x = torch.randn(2, 5, 7, 24, generator=g)
    with torch.no_grad():
        exact = _plain_grn(m.double(), x.double())
        m.to(dtype)
        fast, plain = m(x.to(dtype)), _plain_grn(m, x.to(dtype))
    _check(fast, plain, exact, dtype)
