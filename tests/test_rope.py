"""ops.qk_norm_rope: every backend against the reference, the reference against the unfused
PyTorch path (RMSNorm modules + the rotary definition), stream joining, errors, compilation."""
import pytest
import torch

from backends import device_of, params
from musefast import ops
from musefast.nn.rope import RopeTables
from musefast.ops import selfcheck
from musefast.ops.rope import QK_NORM_ROPE
from musefast.reference import agreement
from musefast.reference import rope as ref_rope


def _ids(text: int, h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(text + h * w, 3)
    ids[text:, 1] = torch.arange(h).repeat_interleave(w).float()
    ids[text:, 2] = torch.arange(w).repeat(h).float()
    return ids


def _inputs(B, lengths, H, axes, dtype, *, seed=0, strided=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    D = sum(axes)
    ids = _ids(lengths[0], 1, sum(lengths[1:])) if len(lengths) > 1 else _ids(0, 1, lengths[0])
    tables = RopeTables(ids, axes)
    qkv = []
    for L in lengths:
        x = 3 * torch.randn(B, L, 3 * H * D + (5 if strided else 0), generator=g)
        qkv.append(x[..., : 3 * H * D].to(dtype))
    wq = [(1 + 0.3 * torch.randn(D, generator=g)).to(dtype) for _ in lengths]
    wk = [(1 + 0.3 * torch.randn(D, generator=g)).to(dtype) for _ in lengths]
    move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    return move(qkv), move(wq), move(wk), tables.cos.to(device), tables.sin.to(device)


SHAPES = [  # (B, stream lengths, heads, axes_dims)
    (1, [1], 1, (8, 16, 16)),  # D/2 = 20: vector steps of 8 pairs and a scalar tail (cpu)
    (2, [5, 13], 3, (4, 4, 4)),  # two streams, odd lengths, D/2 = 6 (not a power of two)
    (1, [7, 16], 8, (16, 56, 56)),  # Meissonic's head layout
    (1, [97], 2, (4, 6, 6)),
]


@pytest.mark.parametrize("backend", params("cuda", "cpu", "triton"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_backend_matches_reference(backend, shape, dtype, comparisons):
    device = device_of(backend)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter does not support bfloat16")
    B, lengths, H, axes = shape
    qkv, wq, wk, cos, sin = _inputs(B, lengths, H, axes, dtype, strided=True, device=device)
    out = torch.stack(ops.qk_norm_rope(qkv, wq, wk, cos, sin, heads=H, backend=backend))
    ref = torch.stack(ops.qk_norm_rope(qkv, wq, wk, cos, sin, heads=H, backend="reference"))
    assert out.dtype == dtype and out.shape == (3, B, H, sum(lengths), sum(axes))
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    else:
        ref32 = torch.stack(ops.qk_norm_rope([x.float() for x in qkv], wq, wk, cos, sin, heads=H, backend="reference"))
        assert agreement.qk_norm_rope_disagreement(out.cpu(), ref32.cpu(), ref.cpu()) is None
    assert torch.equal(out[2], ref[2])  # v is moved, not computed
    comparisons.add(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_is_the_unfused_path(dtype):
    """The definition equals torch's RMSNorm (its weight) then the full-table rotary definition."""
    B, H, axes = 2, 3, (4, 6, 6)
    D = sum(axes)
    (qkv,), (wq,), (wk,), cos, sin = _inputs(B, [19], H, axes, torch.float32, seed=3)
    q, k, v = ref_rope.qk_norm_rope(qkv, wq, wk, *(t.repeat_interleave(2, dim=1) for t in (cos, sin)), H, 1e-6)
    norm_q, norm_k = torch.nn.RMSNorm(D, eps=1e-6), torch.nn.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm_q.weight.copy_(wq)
        norm_k.weight.copy_(wk)
    heads = qkv.view(B, 19, 3, H, D).permute(2, 0, 3, 1, 4)
    full = ref_rope.rope_tables(_ids(0, 1, 19), axes)
    torch.testing.assert_close(q, ref_rope.apply_rope(norm_q(heads[0]), *full), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, ref_rope.apply_rope(norm_k(heads[1]), *full), atol=1e-6, rtol=1e-6)
    assert torch.equal(v, heads[2])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_streams_join_along_the_sequence(backend):
    """Two streams give the single-stream results of each, at their row offsets; zero angles
    (text ids) leave the normalised rows unrotated, exactly."""
    H, axes = 2, (4, 4, 8)
    qkv, wq, wk, cos, sin = _inputs(2, [6, 9], H, axes, torch.float32, seed=5)
    joint = torch.stack(ops.qk_norm_rope(qkv, wq, wk, cos, sin, heads=H, backend=backend))
    text = torch.stack(ops.qk_norm_rope(qkv[0], wq[0], wk[0], cos[:6], sin[:6], heads=H, backend=backend))
    image = torch.stack(ops.qk_norm_rope(qkv[1], wq[1], wk[1], cos[6:], sin[6:], heads=H, backend=backend))
    assert torch.equal(joint, torch.cat([text, image], dim=3))
    unrotated = torch.stack(ops.qk_norm_rope(qkv[0], wq[0], wk[0], torch.ones_like(cos[:6]), torch.zeros_like(sin[:6]),
                                             heads=H, backend=backend))
    assert torch.equal(text, unrotated)
    assert not torch.allclose(image[:2], torch.stack(ops.qk_norm_rope(
        qkv[1], wq[1], wk[1], torch.ones_like(cos[6:]), torch.zeros_like(sin[6:]), heads=H, backend=backend))[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_stays_in_its_head(dtype):
    """A NaN poisons only its own head's norm (bf16 rounding keeps it NaN), as in the reference."""
    (qkv,), wq, wk, cos, sin = _inputs(1, [5], 2, (4, 6, 6), dtype)
    qkv[0, 3, 16 + 1] = float("nan")  # q, head 1, row 3
    out = torch.stack(ops.qk_norm_rope(qkv, wq, wk, cos, sin, heads=2, backend="cpu"))
    ref = torch.stack(ops.qk_norm_rope(qkv, wq, wk, cos, sin, heads=2, backend="reference"))
    assert torch.isnan(out[0, 0, 1, 3]).all() and int(torch.isnan(out).sum()) == 16
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, equal_nan=True, atol=2e-6, rtol=2e-6)


def test_selfcheck_passes_and_catches_a_wrong_backend(monkeypatch):
    assert selfcheck.check_qk_norm_rope("cpu", torch.device("cpu")) is None
    real = QK_NORM_ROPE.backends["cpu"].fn
    monkeypatch.setattr(QK_NORM_ROPE.backends["cpu"], "fn", lambda *a: real(*a) * 1.001)
    assert "max error" in selfcheck.check_qk_norm_rope("cpu", torch.device("cpu"))


def _good():
    return _inputs(1, [4], 2, (2, 2, 4), torch.float32)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "qkv": "x"}, "qkv must be a tensor or a non-empty sequence"),
    (lambda a: {**a, "qkv": a["qkv"][0].long()}, "float32, float16 or bfloat16"),
    (lambda a: {**a, "qkv": a["qkv"][0][..., :-3]}, r"\(B, L, 3·heads·D\)"),
    (lambda a: {**a, "heads": 0}, "heads must be an int >= 1"),
    (lambda a: {**a, "eps": float("nan")}, "eps must be a finite number"),
    (lambda a: {**a, "q_weight": torch.ones(5)}, r"q_weight must be \(8,\)"),
    (lambda a: {**a, "k_weight": [torch.ones(8)] * 2}, "one tensor per qkv stream"),
    (lambda a: {**a, "cos": a["cos"][:3]}, r"cos must be float32 \(4, 4\)"),
    (lambda a: {**a, "sin": a["sin"].double()}, "sin must be float32"),
    (lambda a: {**a, "qkv": [a["qkv"][0], a["qkv"][0][:, :, :24]], "q_weight": a["q_weight"] * 2,
                "k_weight": a["k_weight"] * 2}, r"qkv\[1\] must be"),
])
def test_bad_input_one_line_error(change, message):
    qkv, wq, wk, cos, sin = _good()
    args = change({"qkv": qkv, "q_weight": wq, "k_weight": wk, "cos": cos, "sin": sin, "heads": 2})
    with pytest.raises((ValueError, TypeError), match=message) as info:
        ops.qk_norm_rope(**args)
    assert "\n" not in str(info.value)


def test_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    qkv, wq, wk, cos, sin = _inputs(2, [3, 5], 2, (2, 2, 4), torch.float32, strided=True)

    def fn(a, b):
        q, k, v = ops.qk_norm_rope([a, b], wq, wk, cos, sin, heads=2)
        return q * 2 + k, v

    eager = fn(*qkv)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*qkv)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
    torch._dynamo.reset()
