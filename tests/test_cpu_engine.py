"""The CPU engine (musefast.cpu.linear): packed oneDNN linears and fused epilogues give the plain
path's logits, leave the weights ordinary, and ``dtype="auto"`` falls back to fp32 without the ISA."""
import copy

import pytest
import torch

from musefast.cpu import linear as cpu
from musefast.models.serialization import load_component, save_component
from musefast.models.transformer import MuseTransformer, MuseTransformerConfig
from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.pipelines import loading
from musefast.pipelines.loading import resolve_dtype, runnable

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

UVIT = UVit2DConfig(hidden_size=64, cond_embed_dim=32, micro_cond_encode_dim=16, micro_cond_embed_dim=80,
                    encoder_hidden_size=48, vocab_size=72, codebook_size=64, in_channels=32, block_out_channels=32,
                    num_res_blocks=1, block_num_heads=2, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, sample_size=4, downsample=True, upsample=True)


def _uvit(seed=0):
    torch.manual_seed(seed)
    model = UVit2D(UVIT).eval()
    with torch.no_grad():  # GRN gamma/beta start at 0: give every parameter a value
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _uvit_inputs(model, B=3):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 72, (B, 4, 4), generator=g)
    ctx = model.prepare_context(torch.randn(B, 7, 48, generator=g).to(model.dtype),
                                torch.randn(B, 32, generator=g).to(model.dtype), torch.tensor([64, 64, 0, 0, 6.0]))
    return tokens, ctx


def _muse(mlp, seed=0):
    torch.manual_seed(seed)
    cfg = MuseTransformerConfig(codebook_size=40, grid_size=4, dim=48, depth=2, num_heads=3, text_dim=24, mlp=mlp,
                                head_mlp=True)
    return MuseTransformer(cfg).eval()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def _plain_and_packed(model, run):
    with cpu.plain():
        plain = run()
    report = cpu.apply(model)
    assert report.linears > 0 and report.packed_bytes > 0
    return plain, run()


def test_uvit_packed_equals_plain_fp32(monkeypatch):
    model = _uvit()
    tokens, ctx = _uvit_inputs(model)
    calls = {"linear": 0, "linear_mul": 0}
    for name in calls:  # count the oneDNN calls: the packed path must really run
        def spy(*a, _name=name, _fn=getattr(cpu, name), **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(cpu, name, spy)
    plain, packed = _plain_and_packed(model, lambda: model(tokens, context=ctx))
    assert calls["linear"] >= 20 and calls["linear_mul"] == UVIT.num_hidden_layers
    assert cpu.is_applied(model) and model.__dict__[cpu.REPORT_ATTR].fused_blocks > 0
    assert _rel(packed, plain) < 1e-5


@pytest.mark.parametrize("mlp", ["gelu", "geglu"])
def test_muse_transformer_packed_equals_plain_fp32(mlp):
    model = _muse(mlp)
    tokens = torch.randint(0, 41, (2, 16))
    text = torch.randn(2, 5, 24)
    plain, packed = _plain_and_packed(model, lambda: model(tokens, text))
    assert _rel(packed, plain) < 1e-5


@torch.no_grad()
def test_uvit_packed_bf16_within_twice_the_plain_bf16_error():
    ref = _uvit()
    tokens, ctx32 = _uvit_inputs(ref)
    expected = ref(tokens, context=ctx32)
    model = copy.deepcopy(ref).to(torch.bfloat16)
    _, ctx = _uvit_inputs(model)
    plain, packed = _plain_and_packed(model, lambda: model(tokens, context=ctx))
    assert packed.dtype == torch.bfloat16
    assert _rel(packed, expected) <= 2 * _rel(plain, expected) + 1e-3


@torch.no_grad()
def test_weights_stay_ordinary_and_the_cache_follows_them(tmp_path):
    model = _uvit()
    tokens, ctx = _uvit_inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu.apply(model)
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    assert all(v.layout == torch.strided for v in state.values())
    # load_state_dict writes in place: the packed weights must follow
    other = _uvit(seed=5)
    model.load_state_dict(other.state_dict())
    with cpu.plain():
        want = other(tokens, context=ctx)
    assert _rel(model(tokens, context=ctx), want) < 1e-5
    # .to(dtype): new storage, repacked in the new dtype
    model.to(torch.bfloat16)
    _, ctx16 = _uvit_inputs(model)
    out16 = model(tokens, context=ctx16)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()
    model.float()
    # a deep copy packs its own weights; saving and loading see the ordinary weights
    twin = copy.deepcopy(model)
    _, ctx = _uvit_inputs(model)
    assert _rel(twin(tokens, context=ctx), model(tokens, context=ctx)) < 1e-6
    save_component(model, tmp_path / "uvit")
    loaded = load_component(tmp_path / "uvit")
    assert not cpu.is_applied(loaded)  # a reader returns the plain module; the loader decides how it runs
    assert runnable(loaded) is loaded and cpu.is_applied(loaded)  # on a CPU: the engine, by default
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    cpu.remove(model)
    assert not cpu.is_applied(model) and "forward" not in model.embed.conv.__dict__


@torch.no_grad()
def test_engine_off_by_environment(tmp_path, monkeypatch):
    save_component(_uvit(), tmp_path / "uvit")
    monkeypatch.setenv("MUSEFAST_CPU_ENGINE", "0")
    assert not cpu.is_applied(runnable(load_component(tmp_path / "uvit")))


def test_grad_and_other_devices_take_the_plain_path():
    model = _muse("geglu")
    cpu.apply(model)
    tokens, text = torch.randint(0, 41, (2, 16)), torch.randn(2, 5, 24)
    model(tokens, text).sum().backward()  # oneDNN's op has no autograd: the plain path must run
    assert model.head.weight.grad is not None


def test_auto_dtype_follows_the_isa(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_isa", lambda: {"bf16": False, "int8": False, "onednn": True})
    assert cpu.auto_dtype() == torch.float32
    assert resolve_dtype("auto", "cpu", torch.float32) == torch.float32
    assert "neither AVX512-BF16 nor AMX" in "\n".join(cpu.describe())
    monkeypatch.setattr(cpu, "cpu_isa", lambda: {"bf16": True, "int8": True, "onednn": True})
    assert resolve_dtype("auto", "cpu", torch.float32) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", torch.float16) == torch.float16  # half weights stay half
    assert resolve_dtype("auto", "cuda", torch.float32) == torch.float32
    assert resolve_dtype(None, "cpu", torch.float32) is None
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("fast", "cpu", torch.float32)
    # a reader takes no "auto": what runs where is the loader's one decision
    with pytest.raises(ValueError, match="resolved when a pipeline loads"):
        load_component("unused", dtype="auto")


def test_doctor_reports_the_engine():
    import musefast

    model = _muse("gelu")
    cpu.apply(model)
    text = musefast.doctor()
    assert "cpu engine:" in text and "MuseTransformer:" in text and "linears packed" in text


@pytest.fixture(scope="module")
def tiny_amused(tmp_path_factory):
    pytest.importorskip("diffusers")
    from amused_tiny import make_tiny_amused

    folder = tmp_path_factory.mktemp("amused")
    make_tiny_amused(folder)
    return folder


@torch.no_grad()
def test_auto_dtype_pipeline_and_the_compat_promise(tiny_amused, monkeypatch):
    """dtype="auto" (the default) runs bf16 where the ISA has it; a compat call still gives the
    tokens of the weights' own dtype, and sampler="compat" at load keeps that dtype."""
    import musefast
    from musefast.pipelines.amused import AmusedPipeline

    monkeypatch.setattr(cpu, "cpu_isa", lambda: {"bf16": True, "int8": True, "onednn": True})
    monkeypatch.setattr(loading, "AUTO_BF16_MIN_PARAMS", 0)  # the tiny model counts as large here
    auto = musefast.load(tiny_amused)
    assert auto.dtype == torch.bfloat16 and auto.text_encoder.dtype == torch.bfloat16
    assert next(auto.vqvae.parameters()).dtype == torch.float32
    plain = AmusedPipeline.from_pretrained(tiny_amused, dtype=None)
    assert plain.dtype == torch.float32
    assert AmusedPipeline.from_pretrained(tiny_amused, sampler="compat").dtype == torch.float32
    kw = dict(num_inference_steps=3, output_type="tokens", progress=False, sampler="compat")
    want = plain("a red house", generator=torch.Generator().manual_seed(3), **kw)
    got = auto("a red house", generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(got, want) and auto._compat_twin.dtype == torch.float32
    fused = auto("a red house", seed=3, num_inference_steps=3, output_type="tokens", progress=False)
    assert fused.shape == want.shape
    monkeypatch.setattr(cpu, "cpu_isa", lambda: {"bf16": False, "int8": True, "onednn": True})
    assert musefast.load(tiny_amused).dtype == torch.float32  # no native bf16: fp32


# -- releasing the plain weights (target: memory ≤ 1.3× the weights) ---------------------------

def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_weights_run_and_rebuild_exactly(dtype):
    model = _muse("geglu").to(dtype)
    tokens, text = torch.randint(0, 41, (2, 16)), torch.randn(2, 5, 24, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    with cpu.plain():
        want = model(tokens, text)
    kept = copy.deepcopy(model)
    assert cpu.apply(kept, release=False).released_bytes == 0
    report = cpu.apply(model, release=True)
    assert report.released_bytes == report.weight_bytes > 0 and "released" in report.line()
    assert all(cpu.is_released(m.weight) for m in _linears(model))
    assert all(params[n] is p for n, p in model.named_parameters())  # the same Parameter objects
    got = model(tokens, text)
    assert torch.equal(got, kept(tokens, text))  # releasing changes nothing the packed path computes
    if dtype == torch.float32:
        assert _rel(got, want) < 1e-5
    with cpu.plain():  # the reference twin rebuilds each weight for its call
        assert torch.equal(model(tokens, text), want)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) and type(state[k]) is torch.Tensor for k, v in before.items())
    ffn = model.blocks[0].mlp.proj_in  # GEGLU's projection: packed as two halves, rebuilt whole
    assert set(cpu._state(ffn).packed) == {"value", "gate"}
    assert torch.equal(cpu._state(ffn).plain_weight(), before["blocks.0.mlp.proj_in.weight"])


@torch.no_grad()
def test_released_weights_follow_load_to_and_deepcopy(tmp_path):
    model = _uvit()
    tokens, ctx = _uvit_inputs(model)
    cpu.apply(model, release=True)
    other = _uvit(seed=5)
    with cpu.plain():
        want = other(tokens, context=ctx)
    model.load_state_dict(other.state_dict())  # restored, copied into, repacked, released again
    assert all(cpu.is_released(m.weight) for m in _linears(model))
    assert _rel(model(tokens, context=ctx), want) < 1e-6
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.state_dict().items())
    twin = copy.deepcopy(model)  # shares the packed weights, owns its Parameters
    assert all(cpu.is_released(m.weight) for m in _linears(twin))
    assert torch.equal(twin(tokens, context=ctx), model(tokens, context=ctx))
    model.to(torch.float64)  # a dtype oneDNN does not take: plain weights, exactly the originals
    assert not any(cpu.is_released(m.weight) for m in _linears(model))
    assert all(torch.equal(model.state_dict()[k], v.double()) for k, v in other.state_dict().items())
    model.to(torch.bfloat16)  # packable again: repacked in bf16 and released
    assert all(cpu.is_released(m.weight) and m.weight.dtype == torch.bfloat16 for m in _linears(model))
    assert all(torch.equal(model.state_dict()[k], v.to(torch.bfloat16)) for k, v in other.state_dict().items())
    save_component(twin, tmp_path / "uvit")
    loaded = runnable(load_component(tmp_path / "uvit"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in other.state_dict().items())
    assert all(cpu.is_released(m.weight) for m in _linears(loaded))  # the loader releases by default
    torch.save(twin, tmp_path / "whole.pt")  # pickling a whole module stores the plain weights
    unpickled = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert all(torch.equal(unpickled.state_dict()[k], v) for k, v in other.state_dict().items())
    cpu.remove(twin)
    assert not any(cpu.is_released(m.weight) for m in _linears(twin))
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in other.state_dict().items())


def test_a_forgotten_reader_of_a_released_weight_fails_loudly(monkeypatch):
    model = _muse("gelu")
    cpu.apply(model, release=True)
    with pytest.raises(RuntimeError, match="restore_weights"):
        model.head.weight.sum()
    with pytest.raises(RuntimeError, match="MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS"):
        torch.nn.functional.linear(torch.randn(2, 48), model.head.weight)
    restored = cpu.restore_weights(model)
    assert restored > 0 and torch.isfinite(model.head.weight.sum())
    monkeypatch.setenv("MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS", "1")
    kept = _muse("gelu")
    assert cpu.apply(kept).released_bytes == 0 and not cpu.is_released(kept.head.weight)


def test_autograd_restores_a_released_weight_for_good():
    model = _muse("geglu")
    cpu.apply(model, release=True)
    head = model.head.weight
    model(torch.randint(0, 41, (2, 16)), torch.randn(2, 5, 24)).sum().backward()
    assert model.head.weight is head and not cpu.is_released(head) and head.grad is not None


_RSS_CHILD = r"""
import json, sys
import torch
from musefast.cpu import linear as cpu
from musefast.models.transformer import MuseTransformer, MuseTransformerConfig

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

cfg = MuseTransformerConfig(codebook_size=1024, grid_size=8, dim=512, depth=4, num_heads=8, text_dim=256, mlp="geglu")
tokens, text = torch.randint(0, 1025, (2, 64)), torch.randn(2, 7, 256)
with torch.no_grad():
    warm = MuseTransformer(MuseTransformerConfig(**{**cfg.__dict__, "depth": 1, "dim": 64, "num_heads": 2})).eval()
    cpu.apply(warm)
    warm(tokens, text)  # oneDNN's one-off set-up belongs to the baseline
    base = hwm()
    model = MuseTransformer(cfg).eval()
    cpu.apply(model)
    model(tokens, text)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"growth": (hwm() - base) / weights, "weights": weights}))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="VmHWM is Linux's")
@pytest.mark.parametrize("keep", ["0", "1"])
def test_peak_rss_stays_within_1_3x_the_weights(keep):
    """A fresh process builds a ~60 MB model, packs it and runs it: its peak RSS grows by at most
    1.3× the weights when the plain copies are released, and by the packed copy more when kept."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS": keep, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD], env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["weights"] > 40 * 2**20
    if keep == "0":
        assert result["growth"] <= 1.3, result
    else:  # the check can fail: keeping both copies needs about twice the weights
        assert result["growth"] >= 1.7, result


@torch.no_grad()
def test_a_weight_tied_to_another_module_is_kept():
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 8), "head": torch.nn.Linear(8, 10, bias=False),
                                 "proj": torch.nn.Linear(8, 8)})
    model["head"].weight = model["embed"].weight
    report = cpu.apply(model, release=True)
    assert not cpu.is_released(model["head"].weight) and cpu.is_released(model["proj"].weight)
    assert report.released_bytes == 8 * 8 * 4 and "kept" in report.line()
    ids = torch.tensor([[1, 2, 3]])
    with cpu.plain():
        want = model["head"](model["embed"](ids))
    assert _rel(model["head"](model["embed"](ids)), want) < 1e-6


def test_old_engine_name_warns_and_resolves_to_musefast_cpu(monkeypatch):
    """``musefast.engine`` (the CPU paths' former, documented name) still imports, with a
    DeprecationWarning, and every old module name is the new module."""
    import importlib
    import sys

    import musefast.cpu.conv
    import musefast.cpu.int8
    import musefast.cpu.linear

    for name in [n for n in sys.modules if n == "musefast.engine" or n.startswith("musefast.engine.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.warns(DeprecationWarning, match="musefast.cpu"):
        engine = importlib.import_module("musefast.engine")
    assert engine.cpu is musefast.cpu.linear and engine.int8 is musefast.cpu.int8
    assert importlib.import_module("musefast.engine.cpu_conv") is musefast.cpu.conv
    # the CPU kernels of the ops went to their ops, as backends
    assert engine.cpu_attention is sys.modules["musefast.ops.attention"]
    assert engine.cpu_norms is sys.modules["musefast.ops.rms_norm"]
