"""``rms_norm_modulate``: the one-pass RMSNorm + modulation kernel (csrc/rms_norm.cpp, the op's
``cpu`` backend) against its reference twin (musefast.reference.rms_norm): fp32 within 1e-5
relative, bf16 within twice the error of the reference computed in bf16 (both against a float64
reference); dispatch, the ``backend=`` override, the self-check and the input errors."""
import pytest
import torch

from musefast import ops
from musefast.cpu import linear as cpu
from musefast.ops import registry, selfcheck
from musefast.ops.registry import BackendUnavailableError
from musefast.reference import rms_norm as ref

needs_kernel = pytest.mark.skipif(
    "not __import__('musefast')._build.extension() or not hasattr(torch.ops.musefast, 'rms_norm_modulate')",
    reason="musefast._C (with rms_norm_modulate) is not built here")


def _inputs(B, N, C, scale_rows, shift, g):
    x = torch.randn(B, N, C, generator=g) * 3 + 0.5
    s = None if scale_rows is None else torch.randn(scale_rows, C, generator=g) + 1
    t = torch.randn(B, C, generator=g) if shift else None
    return x, s, t


CASES = [(3, 17, 40, 3, True), (2, 256, 1024, 2, True), (1, 1, 8, 1, False), (4, 5, 77, None, True),
         (2, 33, 768, None, False)]


@needs_kernel
@pytest.mark.parametrize("B,N,C,scale_rows,shift", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(B, N, C, scale_rows, shift, dtype):
    g = torch.Generator().manual_seed(B * 1000 + N + C)
    x, s, t = _inputs(B, N, C, scale_rows, shift, g)
    exact = ref.rms_norm_modulate(x.double(), 1e-6, *(None if a is None else a.double() for a in (s, t)))
    cast = [None if a is None else a.to(dtype) for a in (x, s, t)]
    fast = ops.rms_norm_modulate(cast[0], 1e-6, cast[1], cast[2], backend="cpu")
    assert fast.dtype == dtype and fast.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    else:
        plain = ref.rms_norm_modulate(*cast[:1], 1e-6, *cast[1:])
        err = float((fast.double() - exact).abs().max())
        base = float((plain.double() - exact).abs().max())
        assert err <= 2 * base + 1e-3, f"bf16 error {err:.3g} > 2 x {base:.3g}"


@needs_kernel
def test_dispatch_picks_the_kernel_and_plain_grad_or_2d_take_the_reference(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, s, t = _inputs(2, 9, 16, 2, True, g)
    ops.rms_norm_modulate(x, 1e-6, s, t)  # the kernel's self-check runs here, before the counting
    the_op = registry.op("rms_norm_modulate")
    calls = []
    for name in ("cpu", "reference"):
        real = the_op.backends[name].fn
        monkeypatch.setattr(the_op.backends[name], "fn", lambda *a, _n=name, _f=real: calls.append(_n) or _f(*a))
    ops.rms_norm_modulate(x, 1e-6, s, t)
    assert calls == ["cpu"]
    with cpu.plain():
        ops.rms_norm_modulate(x, 1e-6, s, t)
    ops.rms_norm_modulate(x.clone().requires_grad_(), 1e-6, s, t)
    ops.rms_norm_modulate(x[0], 1e-6, s[:1], None)  # 2-D: not the kernel's layout
    ops.rms_norm_modulate(x, 1e-6, s.double(), t)  # scale in another dtype
    assert calls == ["cpu"] + ["reference"] * 4


def test_forced_backend_that_cannot_run_says_why():
    x = torch.randn(2, 3, 8, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="float32 or bfloat16"):
        ops.rms_norm_modulate(x, 1e-6, backend="cpu")
    with ops.use_backend("rms_norm_modulate=reference"):
        torch.testing.assert_close(ops.rms_norm_modulate(x, 1e-6), ref.rms_norm_modulate(x, 1e-6, None, None))


def test_registered_like_every_op():
    table = ops.backends("cpu")["rms_norm_modulate"]
    assert set(table) == {"cpu", "reference"} and table["reference"] == "ok"
    assert registry.op("rms_norm_modulate").check is selfcheck.check_rms_norm_modulate


@needs_kernel
def test_selfcheck_passes_the_kernel_and_catches_a_wrong_one(monkeypatch):
    assert selfcheck.check_rms_norm_modulate("cpu", torch.device("cpu")) is None
    backend = registry.op("rms_norm_modulate").backends["cpu"]
    real = backend.fn
    monkeypatch.setattr(backend, "fn", lambda x, eps, s, t: real(x, eps, s, None))  # the shift dropped
    assert "max error" in selfcheck.check_rms_norm_modulate("cpu", torch.device("cpu"))
    # a float32 result off by 1e-4 relative: within bf16's rounding, far outside float32's
    monkeypatch.setattr(backend, "fn", lambda x, eps, s, t: real(x, eps, s, t) * (1 + 1e-4))
    assert "max error" in selfcheck.check_rms_norm_modulate("cpu", torch.device("cpu"))


def test_bad_input_is_one_clear_error():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 8\) or \(1, 8\)"):
        ops.rms_norm_modulate(x, 1e-6, torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 8\)"):
        ops.rms_norm_modulate(x, 1e-6, None, torch.randn(1, 8))
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        ops.rms_norm_modulate(x.long(), 1e-6)
    with pytest.raises(ValueError, match=r"x must have shape \(B, ..., C\)"):
        ops.rms_norm_modulate(x[0, 0], 1e-6)


@needs_kernel
def test_the_kernel_refuses_bad_input_in_one_line():
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match=r"scale must be \(B, C\) or \(1, C\)"):
        torch.ops.musefast.rms_norm_modulate(x, torch.randn(3, 8), None, 1e-6)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        torch.ops.musefast.rms_norm_modulate(x.half(), None, None, 1e-6)
    with pytest.raises(RuntimeError, match=r"x must be \(B, N, C\)"):
        torch.ops.musefast.rms_norm_modulate(x[0], None, None, 1e-6)
