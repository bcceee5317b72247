"""The CPU engine on an AVX2-only CPU, proven on any x86 machine: oneDNN is capped with
``ONEDNN_MAX_CPU_ISA=AVX2`` (read once, when torch first uses oneDNN, so every case runs in a child
process started with the cap). There, the demo and a tiny aMUSEd pipeline load and generate in
bfloat16, float16 and ``dtype="auto"`` (which picks float32: no native bf16 within the cap), fp16
tokens equal the plain path's (``cpu.plain()``), bf16 logits keep the engine's rule against the
plain bf16 path (within twice its error against float32: the rule of test_cpu_engine.py, under
which bf16 tokens near a tie may differ, on AVX-512 too), and ``quantize="int8"`` is refused in one line
naming VNNI (without it oneDNN's int8 products saturate)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from amused_tiny import make_tiny_amused
from musefast.cpu import isa

needs_avx2 = pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and isa.effective()["avx2"]),
                                reason="needs oneDNN and an x86 CPU with AVX2 (the cap can only lower the ISA)")

TESTS = Path(__file__).resolve().parent

_CHILD = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[2])
import musefast
from musefast.cpu import int8, isa, linear as cpu
from musefast.pipelines import loading
from musefast.pipelines.amused import AmusedPipeline

loading.AUTO_BF16_MIN_PARAMS = 0  # the tiny models count as large: "auto" then follows the ISA alone
folder, out = sys.argv[1], {"path": isa.effective()["path"], "reason": isa.reason()}
alive = []  # pipelines doctor reports on at the end
kw = dict(num_inference_steps=4, output_type="tokens", progress=False)
prompts = ["a red house", "a blue circle on the left", "two green squares", "a cat"]


def tokens(pipe, **extra):
    return pipe(prompts, seed=3, **kw, **extra)


def refusal(load):
    try:
        load()
    except ValueError as e:
        return str(e)
    return None


def check(name, load):
    pipe = load("auto")
    out[f"{name}_auto"] = str(pipe.dtype)
    exact = tokens(load(None))  # float32 as saved: what both half-precision paths approximate
    for dtype in (torch.bfloat16, torch.float16):
        pipe = load(dtype)
        alive.append(pipe)
        got = tokens(pipe)
        with cpu.plain():
            want = tokens(pipe)
        label = f"{name}_{str(dtype).removeprefix('torch.')}"
        out[label] = {"dtype": str(pipe.dtype), "shape": list(got.shape), "equal_to_plain": torch.equal(got, want),
                      "agreement": (got == want).float().mean().item(),
                      "fp32_agreement": (got == exact).float().mean().item(),
                      "plain_fp32_agreement": (want == exact).float().mean().item()}
    out[f"{name}_int8"] = refusal(lambda: load(None, quantize="int8"))


check("demo", lambda dtype, **k: musefast.load("demo", dtype=dtype, **k))
if not folder:  # no diffusers to build the tiny aMUSEd folder: the demo's results only
    out["doctor"] = cpu.describe()
    print("RESULT " + json.dumps(out))
    sys.exit(0)
check("amused", lambda dtype, **k: AmusedPipeline.from_pretrained(folder, dtype=dtype, **k))

pipe = AmusedPipeline.from_pretrained(folder, dtype=torch.float32)
pipe.to(dtype=torch.bfloat16)  # converting a loaded pipeline repacks for the ISA too
out["amused_to_bf16"] = {"dtype": str(pipe.dtype), "shape": list(tokens(pipe).shape)}

# the engine's bf16 logits rule, on the tiny aMUSEd transformer
model = pipe.transformer
g = torch.Generator().manual_seed(1)
c = model.config
ids = torch.randint(0, c.codebook_size, (3, c.sample_size, c.sample_size), generator=g)
hidden = torch.randn(3, 7, c.encoder_hidden_size, generator=g)
pooled = torch.randn(3, c.cond_embed_dim, generator=g)
micro = torch.tensor([16.0, 16, 0, 0, 6])
with torch.no_grad():
    packed = model(ids, context=model.prepare_context(hidden.bfloat16(), pooled.bfloat16(), micro)).float()
    with cpu.plain():
        plain = model(ids, context=model.prepare_context(hidden.bfloat16(), pooled.bfloat16(), micro)).float()
    model.float()
    with cpu.plain():
        exact = model(ids, context=model.prepare_context(hidden, pooled, micro)).float()
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
out["logits"] = {"packed_vs_fp32": rel(packed, exact), "plain_vs_fp32": rel(plain, exact),
                 "packed_vs_plain": rel(packed, plain)}
out["doctor"] = cpu.describe()
print("RESULT " + json.dumps(out))
"""


def run_capped(code: str, *args: str, cap: str = "AVX2", timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -c code args`` with oneDNN capped at ``cap``, from outside the repository root (the
    root's folders must not shadow installed packages)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          cwd=TESTS, timeout=timeout)


@pytest.fixture(scope="module")
def avx2(tmp_path_factory):
    folder = ""
    if importlib.util.find_spec("diffusers") is not None:  # the tiny aMUSEd folder is written by diffusers
        folder = tmp_path_factory.mktemp("amused")
        make_tiny_amused(folder)
    proc = run_capped(_CHILD, str(folder), str(TESTS))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def _needs(results: dict, name: str) -> None:
    if not any(key.startswith(name) for key in results):
        pytest.skip(f"no {name} results: the tiny aMUSEd folder needs diffusers (the peers extra)")


@needs_avx2
def test_the_cap_selects_the_avx2_path(avx2):
    assert avx2["path"] == "avx2"
    assert avx2["reason"].startswith("cpu path: avx2") and "ONEDNN_MAX_CPU_ISA" in avx2["reason"]


@needs_avx2
@pytest.mark.parametrize("name", ["demo", "amused"])
def test_auto_picks_float32(avx2, name):
    _needs(avx2, name)
    assert avx2[f"{name}_auto"] == "torch.float32"


@needs_avx2
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["demo", "amused"])
def test_half_precision_loads_and_generates(avx2, name, dtype):
    _needs(avx2, name)
    got = avx2[f"{name}_{dtype}"]
    assert got["dtype"] == f"torch.{dtype}" and got["shape"][0] == 4
    if dtype == "float16":  # fp16 products are exact in fp32 and both paths sum in fp32: the same tokens
        assert got["equal_to_plain"], got
    else:  # bf16 output rounding differs (the packed path adds residuals before rounding, plain after), and
        # tokens near a tie follow it: the accuracy rule is on the logits (below). Here, over these 64
        # tokens, the packed path keeps as many of the float32 tokens as plain bf16, within 8 tokens
        assert got["fp32_agreement"] >= got["plain_fp32_agreement"] - 0.125, repr(got)


@needs_avx2
def test_converting_a_loaded_pipeline_to_bf16(avx2):
    _needs(avx2, "amused")
    assert avx2["amused_to_bf16"]["dtype"] == "torch.bfloat16"


@needs_avx2
def test_bf16_logits_within_the_engines_rule(avx2):
    _needs(avx2, "amused")
    err = avx2["logits"]
    assert err["packed_vs_fp32"] <= 2 * err["plain_vs_fp32"] + 1e-3, err


@needs_avx2
@pytest.mark.parametrize("name", ["demo", "amused"])
def test_int8_is_refused_in_one_line_naming_vnni(avx2, name):
    _needs(avx2, name)
    message = avx2[f"{name}_int8"]
    assert message is not None and "\n" not in message and "VNNI" in message


@needs_avx2
def test_doctor_names_the_packing(avx2):
    assert avx2["doctor"][0].startswith("cpu engine:") and "-> float32" in avx2["doctor"][0]
    assert any("bfloat16 weights packed as float32" in line for line in avx2["doctor"][1:]), avx2["doctor"]


SAPPHIRE = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                      "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"})
ZEN4 = SAPPHIRE - {"amx_tile", "amx_bf16", "amx_int8"}
ALDER = frozenset({"avx2", "fma", "avx_vnni"})


@pytest.mark.parametrize("flags, cap, path, vnni", [
    (ZEN4, None, "avx512-bf16", True),
    (ZEN4, "AVX512_CORE_BF16", "avx512-bf16", True),
    (ZEN4, "AVX512_CORE", "avx512", False),  # AVX512_CORE holds neither VNNI nor AVX-VNNI
    (ZEN4, "avx2", "avx2", False),  # case-insensitive, as oneDNN
    (ZEN4, "SSE41", "none", False),
    (ZEN4, "NOT_AN_ISA", "avx512-bf16", True),  # oneDNN ignores an unknown name
    (SAPPHIRE, None, "avx512-amx", True),
    (SAPPHIRE, "AVX512_CORE_BF16", "avx512-bf16", True),
    (ALDER, None, "avx2", True),
    (ALDER, "AVX2", "avx2", False),
    (ALDER, "AVX2_VNNI", "avx2", True),
    (frozenset({"sse4_2"}), None, "none", False),
])
def test_the_path_is_the_cpu_flags_within_the_cap(monkeypatch, flags, cap, path, vnni):
    monkeypatch.setattr(isa, "cpu_flags", lambda: flags)
    monkeypatch.setattr(isa, "_is_x86", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    got = isa.effective.__wrapped__()  # uncached: the process's own answer stays as it is
    assert (got["path"], got["vnni"]) == (path, vnni) or not got["onednn"]


def test_the_legacy_cap_name_and_a_non_x86_cpu(monkeypatch):
    monkeypatch.setattr(isa, "cpu_flags", lambda: ZEN4)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert isa.onednn_cap() == "AVX2"
    monkeypatch.setattr(isa, "_is_x86", lambda: False)
    assert isa.effective.__wrapped__()["path"] == "none"
