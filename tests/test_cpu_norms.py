"""The one-pass RMSNorm + modulation kernel (csrc/rms_norm.cpp via musefast.cpu.norms)
against its reference twin: fp32 within 1e-5 relative, bf16 within twice the error of the
reference computed in bf16 (both against a float64 reference)."""
import pytest
import torch

from musefast import _build
from musefast.cpu import linear as cpu, norms as cpu_norms


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if _build.extension() is None or not hasattr(torch.ops.musefast, "rms_norm_modulate"):
        pytest.skip(f"musefast._C is not built: {_build.extension_error()}")


def _inputs(B, N, C, scale_rows, shift, g):
    x = torch.randn(B, N, C, generator=g) * 3 + 0.5
    s = None if scale_rows is None else torch.randn(scale_rows, C, generator=g) + 1
    t = torch.randn(B, C, generator=g) if shift else None
    return x, s, t


CASES = [(3, 17, 40, 3, True), (2, 256, 1024, 2, True), (1, 1, 8, 1, False), (4, 5, 77, None, True),
         (2, 33, 768, None, False)]


@pytest.mark.parametrize("B,N,C,scale_rows,shift", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(B, N, C, scale_rows, shift, dtype):
    g = torch.Generator().manual_seed(B * 1000 + N + C)
    x, s, t = _inputs(B, N, C, scale_rows, shift, g)
    exact = cpu_norms.reference(x.double(), 1e-6, *(None if a is None else a.double() for a in (s, t)))
    cast = [None if a is None else a.to(dtype) for a in (x, s, t)]
    fast = torch.ops.musefast.rms_norm_modulate(cast[0], cast[1], cast[2], 1e-6)
    assert fast.dtype == dtype and fast.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    else:
        plain = cpu_norms.reference(*cast[:1], 1e-6, *cast[1:])
        err = float((fast.double() - exact).abs().max())
        base = float((plain.double() - exact).abs().max())
        assert err <= 2 * base + 1e-3, f"bf16 error {err:.3g} > 2 x {base:.3g}"


def test_dispatch_uses_the_kernel_and_plain_or_grad_uses_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, s, t = _inputs(2, 9, 16, 2, True, g)
    calls = []
    real = cpu_norms.reference
    monkeypatch.setattr(cpu_norms, "reference", lambda *a: calls.append(1) or real(*a))
    cpu_norms.rms_norm_modulate(x, 1e-6, s, t)
    assert calls == []  # the kernel ran
    with cpu.plain():
        cpu_norms.rms_norm_modulate(x, 1e-6, s, t)
    cpu_norms.rms_norm_modulate(x.clone().requires_grad_(), 1e-6, s, t)
    cpu_norms.rms_norm_modulate(x[0], 1e-6, s[:1], None)  # 2-D: not the kernel's layout
    assert calls == [1, 1, 1]


def test_bad_input_is_one_clear_error():
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match=r"scale must be \(B, C\) or \(1, C\)"):
        torch.ops.musefast.rms_norm_modulate(x, torch.randn(3, 8), None, 1e-6)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        torch.ops.musefast.rms_norm_modulate(x.half(), None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"x must be \(B, N, C\)"):
        torch.ops.musefast.rms_norm_modulate(x[0], None, None, 1e-6)
