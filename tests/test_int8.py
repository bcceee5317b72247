"""The opt-in int8 path (musefast.cpu.int8) against its fake-quant reference twin
(musefast.reference.int8_linear), and its API: loading with quantize="int8", ordinary weights,
and the one-line errors where it cannot run."""
import pytest
import torch
from torch import nn

from musefast.cpu import int8, linear as cpu
from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.reference.int8_linear import int8_linear, quantize_rows

pytestmark = pytest.mark.skipif(bool(int8.unavailable_reasons()), reason="; ".join(int8.unavailable_reasons()))

UVIT = UVit2DConfig(hidden_size=64, cond_embed_dim=32, micro_cond_encode_dim=16, micro_cond_embed_dim=80,
                    encoder_hidden_size=48, vocab_size=72, codebook_size=64, in_channels=32, block_out_channels=32,
                    num_res_blocks=1, block_num_heads=2, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, sample_size=4)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear(k, n, bias, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    lin.requires_grad_(False)
    return lin


@pytest.mark.parametrize("m,k,n", [(1, 8, 1), (97, 59, 72), (5, 1024, 33)])
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_int8_linear_equals_fake_quant_twin_fp32(m, k, n, bias):
    lin = _linear(k, n, bias)
    x = torch.randn(2, m, k) * torch.linspace(0.1, 4, m)[:, None]  # tokens of different scales: per-token quant
    ref = int8_linear(x, lin.weight, lin.bias)
    int8.apply(lin)
    out = lin(x)
    assert out.shape == (2, m, n) and out.dtype == torch.float32
    # integer products are exact in both; only float32 scaling/summation order differs
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@torch.no_grad()
def test_int8_linear_bf16_and_non_contiguous_input():
    lin = _linear(59, 40, True).to(torch.bfloat16)
    x = torch.randn(59, 13).t().to(torch.bfloat16)  # (13, 59), not contiguous
    ref = int8_linear(x, lin.weight, lin.bias)
    int8.apply(lin)
    out = lin(x)
    assert out.dtype == torch.bfloat16
    # both round the same float32 result to bf16: at most one bf16 ulp apart
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


@torch.no_grad()
def test_int8_is_close_to_float_but_not_equal():
    lin = _linear(256, 128, True)
    x = torch.randn(64, 256)
    exact = lin(x)
    int8.apply(lin)
    err = _rel(lin(x), exact)
    assert 1e-5 < err < 0.02  # really quantized; per-token/per-channel int8 of Gaussian data: ~1%


@torch.no_grad()
def test_zero_rows_give_zeros_not_nans():
    lin = _linear(16, 4, False)
    lin.weight[1] = 0
    x = torch.randn(3, 16)
    x[0] = 0
    q, scale = quantize_rows(x)
    assert scale[0].item() == 1 and not q[0].any()
    int8.apply(lin)
    out = lin(x)
    assert torch.isfinite(out).all() and not out[0].any() and not out[:, 1].any()


def _uvit():
    torch.manual_seed(0)
    model = UVit2D(UVIT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 72, (3, 4, 4), generator=g)
    ctx = model.prepare_context(torch.randn(3, 7, 48, generator=g), torch.randn(3, 32, generator=g),
                                torch.tensor([64, 64, 0, 0, 6.0]))
    return model, tokens, ctx


@torch.no_grad()
def test_uvit_int8_equals_twin_and_replaces_the_cpu_engine(monkeypatch):
    model, tokens, ctx = _uvit()
    exact = model(tokens, context=ctx)
    cpu.apply(model)
    report = int8.apply(model)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert report.linears == linears and int8.is_applied(model) and not cpu.is_applied(model)
    calls = []
    fast = int8.linear
    monkeypatch.setattr(int8, "linear", lambda m, x: calls.append(1) or fast(m, x))
    out = model(tokens, context=ctx)
    assert len(calls) >= 20  # the int8 path really ran
    monkeypatch.setattr(int8, "linear", lambda m, x: int8_linear(x, m.weight, m.bias))
    twin = model(tokens, context=ctx)
    # a near-tie of rounding can flip one integer upstream: a loose bound still far below int8's own error
    assert _rel(out, twin) < 1e-4
    assert 1e-4 < _rel(out, exact) < 0.05


@torch.no_grad()
def test_weights_stay_float_and_the_cache_follows_them(tmp_path):
    model, tokens, ctx = _uvit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8.apply(model)
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    first = model(tokens, context=ctx)
    other, _, _ = _uvit()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict())  # in-place copies: the int8 cache must notice
    second = model(tokens, context=ctx)
    int8.remove(model)
    assert not int8.is_applied(model)
    int8.apply(model)
    assert torch.equal(model(tokens, context=ctx), second) and not torch.equal(first, second)


def test_inference_only_and_cpu_only():
    lin = nn.Linear(8, 4)  # requires_grad weights, grad mode on
    int8.apply(lin)
    with pytest.raises(RuntimeError, match="no_grad"):
        lin(torch.randn(2, 8))
    with pytest.raises(ValueError, match="device='cpu'"):
        int8.check("int8", "cuda")
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        int8.check("int4")


def test_without_vnni_a_one_line_error_names_the_fix(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_isa", lambda: {"bf16": True, "int8": False, "onednn": True})
    with pytest.raises(ValueError, match="no int8 dot products.*Load without quantize") as err:
        int8.apply(nn.Linear(4, 4))
    assert "\n" not in str(err.value)
    assert "unavailable: no int8 dot products" in int8.describe()[0] and "VNNI" in int8.describe()[0]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from musefast.models.text import load_text_encoder
    from musefast.pipelines.random_init import random_pipeline
    from tiny_text import make_tiny_t5

    root = tmp_path_factory.mktemp("int8")
    t5 = load_text_encoder(make_tiny_t5(root / "t5"))
    return random_pipeline("tiny", text_encoder=t5).save_pretrained(root / "model")


def test_load_with_quantize_int8(pipeline_dir):
    import musefast

    pipe = musefast.load(pipeline_dir, quantize="int8")
    assert int8.is_applied(pipe.transformer)
    assert not int8.is_applied(pipe.vqgan) and not int8.is_applied(pipe.text_encoder.model)  # float
    assert any("linears in int8" in line for line in int8.describe())
    images = pipe("a red circle", num_steps=2, seed=0, output_type="pt", progress=False)
    assert torch.isfinite(images).all()
    assert not int8.is_applied(musefast.load(pipeline_dir).transformer)  # opt-in
    with pytest.raises(ValueError, match="quantize must be"):
        musefast.load(pipeline_dir, quantize="int4")


def test_cli_quantize_flag(pipeline_dir, tmp_path):
    from musefast.cli import main

    out = tmp_path / "q.png"
    assert main(["generate", "a cat", "--model", str(pipeline_dir), "--steps", "1", "-q", "--quantize", "int8",
                 "-o", str(out)]) == 0
    assert out.is_file()

