"""aMUSEd on a CPU: musefast (its CPU engine) vs diffusers eager vs OpenVINO, side by side in one run.

(a) one transformer forward at the CFG batch (B = 2) on the real aMUSEd architectures (random
weights); (b) text to image end to end through each pipeline's public call: 12 steps, batch 1,
CLIP-L-sized text encoder and VQ decode included.

Peers: diffusers' ``UVit2DModel`` / ``AmusedPipeline`` in eager PyTorch, and OpenVINO — the same
diffusers modules converted with ``openvino.convert_model`` and compiled for the CPU with the f32
and bf16 precision hints, run inside diffusers' pipeline as OpenVINO's aMUSEd notebook does
(transformer, text encoder and VQ decoder replaced by callables over the compiled models).
OpenVINO is optional: its cases are skipped with a reason when it is not installed.

Implementations are timed interleaved (round robin, ``ROUNDS`` rounds) in one process, and the
median, min and max are recorded: the machine may be shared. Size by ``MUSEFAST_CPU_BENCH``:
``reduced`` (default: small widths, for CI), ``amused-256`` or ``amused-512`` (forward only:
one forward of each is minutes on 2 cores). Threads: torch's (``OMP_NUM_THREADS``), the same
count given to OpenVINO.

Every result records the ISA it ran on (``isa``: CPU model, the flags that matter, the caps in
effect, musefast's CPU path) and the load average before and after it (the machine may be shared).
To measure an AVX2-only CPU on a newer one, cap every library that dispatches by ISA before the
process starts: ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN: musefast's engine, PyTorch's mkldnn ops),
``MKL_ENABLE_INSTRUCTIONS=AVX2`` (MKL: PyTorch's fp32 ``F.linear``, diffusers), and
``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's own vector kernels). OpenVINO's kernels are recorded per
compiled model (``openvino_kernels``: its primitive types, which name the ISA they were built for).
musefast's C++ kernels are compiled for the host (-march=native) and are not capped.

    MUSEFAST_CPU_BENCH=amused-256 pytest benchmarks/test_bench_cpu_peers.py \\
        --benchmark-json benchmarks/results/cpu-<date>.json
"""
from __future__ import annotations

import copy
import gc
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

diffusers = pytest.importorskip("diffusers")

from musefast.cpu import isa, linear as cpu  # noqa: E402

SIZE = os.environ.get("MUSEFAST_CPU_BENCH", "reduced")
ROUNDS = int(os.environ.get("MUSEFAST_CPU_BENCH_ROUNDS", "5" if SIZE == "reduced" else "3"))
STEPS = 12
PROMPT = "a photo of a red cat on the house"

_UVIT = {  # diffusers UVit2DModel configs (the class defaults are amused-256's)
    "amused-256": dict(sample_size=16),
    "amused-512": dict(sample_size=32, downsample=True, upsample=True),
    "reduced": dict(sample_size=16, hidden_size=256, num_attention_heads=4, num_hidden_layers=4, in_channels=128,
                    block_out_channels=128, block_num_heads=4, num_res_blocks=1, intermediate_size=704,
                    cond_embed_dim=256, encoder_hidden_size=256),
}
_VQ = {
    "full": dict(block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2),
    "reduced": dict(block_out_channels=(32, 32, 64, 64, 64), layers_per_block=1),
}


@pytest.fixture(autouse=True)
def _isa_and_load(benchmark):
    """The ISA and the machine's load (1/5/15-minute averages) beside every result."""
    benchmark.extra_info["isa"] = isa.record()
    benchmark.extra_info["load_before"] = list(os.getloadavg())
    yield
    benchmark.extra_info["load_after"] = list(os.getloadavg())


def _ov_kernels(compiled) -> dict:
    """How many nodes of a compiled OpenVINO model run each primitive type (``jit_avx2_FP32``,
    ``brgemm_avx512_BF16``...): which ISA OpenVINO really used."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        kind = info["primitiveType"] if "primitiveType" in info else "?"
        kind = str(getattr(kind, "value", kind))  # an OVAny
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _openvino():
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def _rounds(benchmark) -> int:
    """One round under ``--benchmark-disable`` (CI checks that the suite runs, not the figures)."""
    return 1 if getattr(benchmark, "disabled", False) else ROUNDS


def _record_against_plain(info: dict, stats: dict, flops: float) -> None:
    """Median, range and GFLOP/s of each timed implementation, and musefast's speedup over its
    plain path (the reference twin timed in the same rounds)."""
    for name, st in stats.items():
        info[f"{name}_ms"] = st["median_ms"]
        info[f"{name}_min_max_ms"] = [st["min_ms"], st["max_ms"]]
        info[f"{name}_gflops"] = flops / st["median_ms"] / 1e6
        info[f"{name}_cpu_ms"] = st["cpu_median_ms"]
    info["speedup_vs_musefast_plain"] = info["musefast_plain_ms"] / info["musefast_ms"]


def _interleaved(fns: dict, rounds: int) -> dict:
    """Round-robin timing: one warm-up call each, then ``rounds`` rounds -> per-name stats (ms).
    Beside wall time, the process's CPU time per call (``cpu_median_ms``): on a shared machine a
    descheduled thread stretches wall time but not CPU time, so at one thread the CPU-time ratio is
    the steadier comparison (at more threads it also counts threads spinning at barriers)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append(1e3 * (time.perf_counter() - t0))
            cpu_times[name].append(1e3 * (time.process_time() - c0))
    return {name: dict(median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts), runs=ts,
                       cpu_median_ms=statistics.median(cpu_times[name]), cpu_runs=cpu_times[name])
            for name, ts in times.items()}


def _diffusers_uvit(size: str):
    from diffusers import UVit2DModel

    torch.manual_seed(0)
    model = UVit2DModel(**_UVIT[size]).eval()
    with torch.no_grad():  # GRN and norm parameters start at 0 / 1: give them values
        for name, p in model.named_parameters():
            if "gamma" in name or "beta" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


class _UVitForOpenVINO(torch.nn.Module):
    """Positional inputs for ``openvino.convert_model`` (the notebook's wrapper, our words)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latents, micro_conds, pooled_text_emb, encoder_hidden_states):
        return self.model(latents, micro_conds=micro_conds, pooled_text_emb=pooled_text_emb,
                          encoder_hidden_states=encoder_hidden_states)


def _compile(ov, model, example: dict, hint: str):
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    return core.compile_model(model, "CPU", config)


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class _Stages:
    """Per-stage wall time of a pipeline call: wraps named methods of its components in place
    (instance attributes, so the pipeline's own calls go through them) and sums their time per
    run. Whatever the wrapped stages do not cover — the sampler's steps, guidance, conditioning
    set-up, tokenization, pre/post-processing — is the ``rest`` of the run."""

    def __init__(self, methods: dict):  # stage -> (object, method name)
        self.totals = dict.fromkeys(methods, 0.0)
        self.calls = dict.fromkeys(methods, 0)
        for stage, (obj, name) in methods.items():
            setattr(obj, name, self._timed(stage, getattr(obj, name)))

    def _timed(self, stage, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[stage] += 1e3 * (time.perf_counter() - t0)
                self.calls[stage] += 1
        return timed

    def run(self, fn):
        """Call ``fn`` and return its per-stage ms and call counts, ``rest_ms`` included."""
        self.totals = dict.fromkeys(self.totals, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)
        t0 = time.perf_counter()
        fn()
        total = 1e3 * (time.perf_counter() - t0)
        return dict(**{f"{k}_ms": v for k, v in self.totals.items()}, rest_ms=total - sum(self.totals.values()),
                    calls=dict(self.calls))


def _staged(stages: _Stages, fn):
    """``fn`` as an entry of :func:`_interleaved` that also keeps each run's stage split."""
    runs = []

    def call():
        runs.append(stages.run(fn))
    call.runs = runs
    return call


def _stage_medians(runs: list[dict], warmups: int = 1) -> dict:
    """Median per stage over the timed runs (the first ``warmups`` runs are the warm-up)."""
    timed = runs[warmups:] or runs
    keys = [k for k in timed[0] if k.endswith("_ms")]
    return {**{k: statistics.median(r[k] for r in timed) for k in keys}, "calls": timed[-1]["calls"]}


# -- (a) one transformer forward at B = 2 --------------------------------------------------------

FORWARD_SIZES = ["reduced"] if SIZE == "reduced" else [SIZE]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("size", FORWARD_SIZES)
def test_cpu_forward(benchmark, size, dtype):
    """musefast UVit2D (plain and CPU engine) vs diffusers UVit2DModel vs OpenVINO, B = 2."""
    from musefast.compat.amused_weights import convert_strict
    from musefast.models.uvit import UVit2D, UVit2DConfig, diffusers_source_keys

    dt = getattr(torch, dtype)
    if dt == torch.bfloat16 and not cpu.cpu_isa()["bf16"]:
        pytest.skip("no native bf16 within oneDNN's reach (AVX512-BF16 / AMX, under ONEDNN_MAX_CPU_ISA): "
                    "bf16 is emulated or widened here")
    theirs = _diffusers_uvit(size)
    cfg = UVit2DConfig(**{k: v for k, v in theirs.config.items() if k in UVit2DConfig.__dataclass_fields__})
    with torch.device("meta"):
        ours = UVit2D(cfg)
    ours.load_state_dict(convert_strict(ours, theirs.state_dict(), diffusers_source_keys, source="diffusers"),
                         assign=True)
    ours.eval().to(dt)
    B, side = 2, cfg.sample_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.codebook_size, (B, side, side), generator=g)
    hidden = torch.randn(B, 77, cfg.encoder_hidden_size, generator=g)
    pooled = torch.randn(B, cfg.cond_embed_dim, generator=g)
    micro = torch.tensor([256.0, 256, 0, 0, 6]).expand(B, 5).contiguous()
    info = benchmark.extra_info
    rss_before = _rss_gib()
    with torch.no_grad():
        context = ours.prepare_context(hidden.to(dt), pooled.to(dt), micro[0])
        report = cpu.apply(ours, release=False)  # the timed plain twin needs its plain weights, not rebuilt per call
        info["pack_seconds"] = report.pack_seconds
        info["packed_mib"] = report.packed_bytes / 2**20
        info["weights_mib"] = report.weight_bytes / 2**20
        ex = dict(latents=tokens, micro_conds=micro, pooled_text_emb=pooled, encoder_hidden_states=hidden)
        ex_dt = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in ex.items()}

        def plain():
            with cpu.plain():
                return ours(tokens, context=context)

        fns = {"musefast": lambda: ours(tokens, context=context), "musefast_plain": plain}
        ov = _openvino()
        if ov is not None:
            t0 = time.perf_counter()
            converted = ov.convert_model(_UVitForOpenVINO(theirs), example_input=ex)
            info["openvino_convert_s"] = time.perf_counter() - t0
            compiled = _compile(ov, converted, ex, "f32" if dt == torch.float32 else "bf16")
            info["openvino_kernels"] = _ov_kernels(compiled)
            del converted
            gc.collect()
            fns["openvino"] = lambda: compiled(ex)
        else:
            info["openvino"] = "skipped: openvino is not installed (pip install openvino)"
        theirs.to(dt)
        fns["diffusers"] = lambda: theirs(ex_dt["latents"], micro_conds=ex_dt["micro_conds"],
                                          pooled_text_emb=ex_dt["pooled_text_emb"],
                                          encoder_hidden_states=ex_dt["encoder_hidden_states"])
        flops = _flops(fns["diffusers"])
        want = plain().float()
        got = fns["musefast"]().float()
        info["musefast_vs_plain_rel_err"] = ((got - want).norm() / want.norm()).item()
        stats = _interleaved(fns, _rounds(benchmark))
    benchmark.pedantic(fns["musefast"], rounds=1, iterations=1)
    for name, s in stats.items():
        info[f"{name}_ms"] = s["median_ms"]
        info[f"{name}_min_max_ms"] = [s["min_ms"], s["max_ms"]]
        info[f"{name}_gflops"] = flops / s["median_ms"] / 1e6
        info[f"{name}_cpu_ms"] = s["cpu_median_ms"]
    for peer in ("diffusers", "openvino", "musefast_plain"):
        if f"{peer}_ms" in info:
            info[f"speedup_vs_{peer}"] = info[f"{peer}_ms"] / info["musefast_ms"]
            info[f"cpu_time_speedup_vs_{peer}"] = info[f"{peer}_cpu_ms"] / info["musefast_cpu_ms"]
    info.update(size=size, dtype=dtype, batch=B, threads=torch.get_num_threads(), gflop=flops / 1e9,
                rounds=_rounds(benchmark), peak_rss_gib=_rss_gib(), rss_before_gib=rss_before)


# -- (b) text to image end to end -------------------------------------------------------------

def _clip(size):
    from tiny_text import clip_vocab_and_merges
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    full = size != "reduced"
    config = CLIPTextConfig(
        vocab_size=49408 if full else len(vocab), hidden_size=768 if full else 256,
        intermediate_size=3072 if full else 512, num_hidden_layers=12 if full else 2,
        num_attention_heads=12 if full else 4, projection_dim=768 if full else 256, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config).eval(), tokenizer


class _TextForOpenVINO(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, return_dict=True, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]


class _VQDecodeForOpenVINO(torch.nn.Module):
    def __init__(self, vq, shape):
        super().__init__()
        self.vq, self.shape = vq, shape

    def forward(self, latents):
        return self.vq.decode(latents, force_not_quantize=True, shape=self.shape).sample


def _openvino_pipeline(ov, pipe, size, hint, converted, kernels: dict):
    """diffusers' AmusedPipeline whose transformer, text encoder and VQ decoder call compiled
    OpenVINO models (what OpenVINO's aMUSEd notebook does)."""
    from collections import namedtuple

    from diffusers import AmusedPipeline

    text = _compile(ov, converted["text"], None, hint)
    uvit = _compile(ov, converted["uvit"], None, hint)
    vq = _compile(ov, converted["vq"], None, "f32")  # the VQ decodes in fp32, as diffusers' force_upcast
    kernels[hint] = {"text": _ov_kernels(text), "uvit": _ov_kernels(uvit), "vq": _ov_kernels(vq)}
    Out = namedtuple("Out", "text_embeds hidden_states")

    class Anchored(torch.nn.Module):
        """A weightless module that tells diffusers where it runs (diffusers reads ``.device``)."""

        device = torch.device("cpu")

    class Text(Anchored):
        def __init__(self):
            super().__init__()
            self.config, self.dtype = pipe.text_encoder.config, torch.float32

        def forward(self, input_ids, return_dict=True, output_hidden_states=True):
            r = text({"input_ids": input_ids})
            emb, hid = (torch.from_numpy(r[i]) for i in range(2))
            return Out(emb, [hid, hid])  # the pipeline reads hidden_states[-2]

    class UVit(Anchored):
        def __init__(self):
            super().__init__()
            self.config = pipe.transformer.config

        def forward(self, latents, micro_conds=None, pooled_text_emb=None, encoder_hidden_states=None, **_):
            return torch.from_numpy(uvit({"latents": latents, "micro_conds": micro_conds,
                                          "pooled_text_emb": pooled_text_emb,
                                          "encoder_hidden_states": encoder_hidden_states})[0])

    class VQ(Anchored):
        def __init__(self):
            super().__init__()
            self.config, self.dtype = pipe.vqvae.config, torch.float32

        def decode(self, latents, force_not_quantize=True, shape=None):
            return namedtuple("Dec", "sample")(torch.from_numpy(vq({"latents": latents})[0]))

    out = AmusedPipeline(vqvae=VQ(), tokenizer=pipe.tokenizer, text_encoder=Text(), transformer=UVit(),
                         scheduler=copy.deepcopy(pipe.scheduler))
    out.set_progress_bar_config(disable=True)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_text_encode(benchmark, dtype):
    """CLIP text encode (CLIP-L/14's size unless ``reduced``; one 77-token prompt), through the
    CPU engine's packed linears vs the plain path (``cpu.plain()``), in one process."""
    dt = getattr(torch, dtype)
    if dt == torch.bfloat16 and not cpu.cpu_isa()["bf16"]:
        pytest.skip("no native bf16 within oneDNN's reach (AVX512-BF16 / AMX, under ONEDNN_MAX_CPU_ISA): "
                    "bf16 is emulated or widened here")
    model, tokenizer = _clip(SIZE)
    model.to(dt)
    ids = tokenizer([PROMPT], return_tensors="pt", padding="max_length", max_length=77).input_ids
    report = cpu.apply(model)

    def packed():
        return model(ids, output_hidden_states=True).hidden_states[-2]

    def plain():
        with cpu.plain():
            return packed()

    info = benchmark.extra_info
    with torch.no_grad():
        want = plain().float()
        info["musefast_vs_plain_rel_err"] = ((packed().float() - want).norm() / want.norm()).item()
        flops = _flops(plain)
        stats = _interleaved({"musefast": packed, "musefast_plain": plain}, _rounds(benchmark))
        benchmark.pedantic(packed, rounds=1, iterations=1)
    _record_against_plain(info, stats, flops)
    info.update(size=SIZE, dtype=dtype, batch=1, threads=torch.get_num_threads(), gflop=flops / 1e9,
                linears=report.linears, rounds=_rounds(benchmark), peak_rss_gib=_rss_gib())


def _diffusers_vqmodel(kw: dict):
    """diffusers' ``VQModel`` at aMUSEd's layout with ``_VQ`` widths and random weights (every
    parameter moved off its initial value: norms start at identity)."""
    from diffusers import VQModel

    levels = len(kw["block_out_channels"])
    vqvae = VQModel(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                    latent_channels=64, num_vq_embeddings=8192, norm_num_groups=32, mid_block_add_attention=False,
                    lookup_from_codebook=True, force_upcast=True, **kw).eval()
    with torch.no_grad():
        for p in vqvae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vqvae


@pytest.mark.parametrize("grid", [8] if SIZE == "reduced" else [16, 32])
def test_cpu_vq_decode(benchmark, grid, tmp_path):
    """VQ decode of a grid x grid token map at aMUSEd's VQ architecture (reduced widths under
    ``reduced``), batch 1, one set of random weights: musefast's CPU path (packed oneDNN
    convolutions, channels-last, skips added in the epilogue) vs the same decoder with torch's
    channels-last ``conv2d`` (``musefast_unpacked``: the path before packing), the plain NCHW path
    (the reference twin), and OpenVINO (diffusers' ``VQModel.decode`` converted, f32 and, where the
    CPU has it, the bf16 hint) and, where bf16 is native, musefast's bf16 decode
    (``cpu.conv.apply(dtype=torch.bfloat16)``); for the record, PyTorch's own bf16 decode (every
    weight and activation in bf16), the error yardstick of the bf16 paths."""
    from musefast.cpu import conv as cpu_conv
    from musefast.models.vqmodel import load_vqmodel

    torch.manual_seed(0)
    theirs = _diffusers_vqmodel(_VQ["reduced" if SIZE == "reduced" else "full"])
    theirs.save_pretrained(tmp_path)
    vq = load_vqmodel(tmp_path)  # the CPU path applied at load, as musefast.load does
    tokens = torch.randint(0, 8192, (1, grid, grid), generator=torch.Generator().manual_seed(1))
    twin = copy.deepcopy(vq)  # the bf16 record: decoder weights in bf16, activations channels-last
    cpu_conv.remove(twin)
    twin.decoder.to(torch.bfloat16)
    twin.post_quant_conv.to(torch.bfloat16)

    def bf16_decode():
        z = twin.quantize.lookup(tokens).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return twin.decoder(twin.post_quant_conv(z)).float().contiguous().clamp_(0, 1)

    def packed():
        return vq.decode(tokens)

    def unpacked():
        with cpu.plain():  # the packed convolutions off; the layout stays channels-last
            return vq.decode(tokens)

    plain_vq = copy.deepcopy(vq)
    cpu_conv.remove(plain_vq)

    def plain():
        return plain_vq.decode(tokens)

    fns = {"musefast": packed, "musefast_unpacked": unpacked, "musefast_plain": plain,
           "pytorch_bf16": bf16_decode}
    if cpu.cpu_isa()["bf16"]:  # the bf16 decode (cpu.conv.apply(dtype=torch.bfloat16)) where bf16 is native
        vq_bf16 = copy.deepcopy(vq)
        cpu_conv.apply(vq_bf16, dtype=torch.bfloat16)
        fns["musefast_bf16"] = lambda: vq_bf16.decode(tokens)
    info = benchmark.extra_info
    ov = _openvino()
    if ov is not None:
        t0 = time.perf_counter()
        converted = ov.convert_model(_VQDecodeForOpenVINO(theirs, (1, grid, grid, 64)), example_input=(tokens,))
        info["openvino_convert_s"] = time.perf_counter() - t0
        info["openvino_kernels"] = {}
        for hint in ("f32", "bf16") if cpu.cpu_isa()["bf16"] else ("f32",):
            compiled = _compile(ov, converted, {}, hint)
            info["openvino_kernels"][hint] = _ov_kernels(compiled)
            fns[f"openvino_{hint}"] = lambda c=compiled: torch.from_numpy(c((tokens,))[0]).clamp_(0, 1)
    else:
        info["openvino"] = "skipped: openvino is not installed (pip install openvino)"
    with torch.no_grad():
        want = plain()
        info["diffusers_vs_plain_max_abs_err"] = (theirs.decode(tokens, force_not_quantize=True,
                                                                shape=(1, grid, grid, 64)).sample.clamp(0, 1)
                                                  - want).abs().max().item()
        for name in [n for n in fns if n != "musefast_plain"]:
            err = (fns[name]() - want).abs()
            info[f"{name}_max_abs_err"], info[f"{name}_mean_abs_err"] = err.max().item(), err.mean().item()
        flops = _flops(plain)
        stats = _interleaved(fns, _rounds(benchmark))
        benchmark.pedantic(packed, rounds=1, iterations=1)
    _record_against_plain(info, stats, flops)
    for peer in [n for n in stats if n.startswith("openvino") or n == "musefast_unpacked"]:
        info[f"speedup_vs_{peer}"] = info[f"{peer}_ms"] / info["musefast_ms"]
        info[f"cpu_time_speedup_vs_{peer}"] = info[f"{peer}_cpu_ms"] / info["musefast_cpu_ms"]
    if "musefast_bf16" in stats and "openvino_bf16" in stats:
        info["bf16_speedup_vs_openvino_bf16"] = info["openvino_bf16_ms"] / info["musefast_bf16_ms"]
        info["bf16_cpu_time_speedup_vs_openvino_bf16"] = info["openvino_bf16_cpu_ms"] / info["musefast_bf16_cpu_ms"]
    info.update(size=SIZE, grid=grid, batch=1, threads=torch.get_num_threads(), gflop=flops / 1e9,
                rounds=_rounds(benchmark), peak_rss_gib=_rss_gib())


def _stage_flops(text_encoder, ids, transformer, example: dict, vq_decode, side: int) -> dict:
    """FLOPs of one call of each stage, counted on the diffusers modules (the same maths for
    every implementation): text encoder (one prompt), transformer (B = 2), VQ decode (B = 1)."""
    return {"text": _flops(lambda: text_encoder(ids)), "transformer": _flops(lambda: transformer(**example)),
            "vq_decode": _flops(lambda: vq_decode(torch.zeros(1, side, side, dtype=torch.long)))}


@pytest.mark.skipif(SIZE == "amused-512", reason="end to end at 512 is out of a CPU run's time budget")
def test_cpu_end_to_end(benchmark, tmp_path):
    """Text to image, 12 steps, batch 1: musefast (dtype auto and fp32) vs diffusers vs
    diffusers+OpenVINO, with each run split into stages (text encode, transformer forwards, VQ
    decode, and the rest: sampling steps and glue)."""
    from diffusers import AmusedPipeline as DiffusersAmused
    from diffusers import AmusedScheduler

    from musefast.pipelines.amused import AmusedPipeline

    size = SIZE
    torch.manual_seed(0)
    vqvae = _diffusers_vqmodel(_VQ["reduced" if size == "reduced" else "full"])
    text_encoder, tokenizer = _clip(size)
    theirs = DiffusersAmused(vqvae=vqvae, tokenizer=tokenizer, text_encoder=text_encoder,
                             transformer=_diffusers_uvit(size), scheduler=AmusedScheduler(mask_token_id=8255))
    theirs.set_progress_bar_config(disable=True)
    theirs.save_pretrained(tmp_path)
    info = benchmark.extra_info
    t0 = time.perf_counter()
    ours = AmusedPipeline.from_pretrained(tmp_path)  # dtype="auto": the CPU default
    info["musefast_load_s"] = time.perf_counter() - t0
    info["musefast_auto_dtype"] = str(ours.dtype).removeprefix("torch.")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    side = theirs.transformer.config.sample_size
    ids = tokenizer([PROMPT], return_tensors="pt", padding="max_length", max_length=77).input_ids
    ex = dict(latents=torch.full((2, side, side), 8255), micro_conds=torch.rand(2, 5),
              pooled_text_emb=torch.rand(2, theirs.transformer.config.cond_embed_dim),
              encoder_hidden_states=torch.rand(2, 77, theirs.transformer.config.encoder_hidden_size))
    vq_decode = _VQDecodeForOpenVINO(vqvae, (1, side, side, 64))
    with torch.no_grad():
        flops = _stage_flops(text_encoder, ids, _UVitForOpenVINO(theirs.transformer), ex, vq_decode, side)

    def ours_call(pipe):
        return lambda: pipe(PROMPT, seed=0, num_inference_steps=STEPS, output_type="pt", progress=False)

    def musefast_stages(pipe):
        return {"text": (pipe.text_encoder, "encode"), "transformer": (pipe.transformer, "forward"),
                "vq_decode": (pipe.vqvae, "decode")}

    def diffusers_stages(pipe):
        return {"text": (pipe.text_encoder, "forward"), "transformer": (pipe.transformer, "forward"),
                "vq_decode": (pipe.vqvae, "decode")}

    pipes = {"musefast": (ours_call(ours), musefast_stages(ours))}
    if ours.dtype != torch.float32 and os.environ.get("MUSEFAST_CPU_BENCH_E2E_FP32", "0") == "1":
        ours32 = AmusedPipeline.from_pretrained(tmp_path, dtype=torch.float32)  # a second copy: memory
        pipes["musefast_fp32"] = (ours_call(ours32), musefast_stages(ours32))
    ov = _openvino()
    if ov is not None:
        t0 = time.perf_counter()
        converted = {
            "text": ov.convert_model(_TextForOpenVINO(text_encoder), example_input=(ids,)),
            "uvit": ov.convert_model(_UVitForOpenVINO(theirs.transformer), example_input=ex),
            "vq": ov.convert_model(vq_decode, example_input=(torch.randint(0, 8192, (1, side, side)),)),
        }
        info["openvino_convert_s"] = time.perf_counter() - t0
        info["openvino_kernels"] = {}
        for hint in ("f32", "bf16") if cpu.cpu_isa()["bf16"] else ("f32",):
            ovp = _openvino_pipeline(ov, theirs, size, hint, converted, info["openvino_kernels"])
            pipes[f"openvino_{hint}"] = (lambda p=ovp: p(PROMPT, generator=gen(), num_inference_steps=STEPS,
                                                         output_type="pt"), diffusers_stages(ovp))
        del converted
        gc.collect()
    else:
        info["openvino"] = "skipped: openvino is not installed (pip install openvino)"
    pipes["diffusers_fp32"] = (lambda: theirs(PROMPT, generator=gen(), num_inference_steps=STEPS, output_type="pt"),
                               diffusers_stages(theirs))
    fns = {name: _staged(_Stages(methods), call) for name, (call, methods) in pipes.items()}
    info["rss_after_setup_gib"] = _rss_gib()
    with torch.no_grad():
        stats = _interleaved(fns, _rounds(benchmark))
    benchmark.pedantic(pipes["musefast"][0], rounds=1, iterations=1)
    for name, st in stats.items():
        info[f"{name}_ms"] = st["median_ms"]
        info[f"{name}_min_max_ms"] = [st["min_ms"], st["max_ms"]]
        stages = _stage_medians(fns[name].runs)
        for stage, per_call in flops.items():
            ms = stages[f"{stage}_ms"]
            stages[f"{stage}_gflops"] = per_call * stages["calls"][stage] / ms / 1e6 if ms > 0 else None
        info[f"{name}_stages"] = stages
        work = sum(per_call * stages["calls"][stage] for stage, per_call in flops.items())
        info[f"{name}_gflops"] = work / st["median_ms"] / 1e6
        info[f"{name}_cpu_ms"] = st["cpu_median_ms"]
    for peer in [n for n in stats if n != "musefast"]:
        info[f"speedup_vs_{peer}"] = info[f"{peer}_ms"] / info["musefast_ms"]
        info[f"cpu_time_speedup_vs_{peer}"] = info[f"{peer}_cpu_ms"] / info["musefast_cpu_ms"]
    info.update(size=size, steps=STEPS, batch=1, threads=torch.get_num_threads(), rounds=_rounds(benchmark),
                stage_gflop_per_call={k: v / 1e9 for k, v in flops.items()}, peak_rss_gib=_rss_gib())
