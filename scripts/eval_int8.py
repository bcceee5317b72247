#!/usr/bin/env python
"""What ``quantize="int8"`` costs in quality and gains in speed on a CPU.

1. ``op_candidates``: the int8 ops torch offers, on aMUSEd-256's linear shapes at M = 512 rows
   (B = 2 · 16²), against oneDNN's packed fp32/bf16 linears, interleaved: (a) fbgemm's
   ``quantized.linear_dynamic`` (per-tensor dynamic input quantization), (b) oneDNN's
   ``qlinear_pointwise`` as musefast runs it (per-token inputs, :func:`musefast.cpu.int8.linear`),
   (c) weight-only int8 with bf16 inputs (``aten._weight_int8pack_mm``).
2. ``amused-256``: the real architecture with random weights, B = 2: logit error of int8 vs fp32
   (max abs, relative RMS) and forward ms of fp32 / bf16 (CPU engine) / int8 (with the rest of
   the model in fp32 and in bf16), interleaved rounds.
3. ``demo``: the embedded model: logit error, token agreement of a 12-step generation with the
   same seeds, checker accuracy of the cfg run (fp32 vs int8), forward ms.

    OMP_NUM_THREADS=2 python scripts/eval_int8.py --count 64 -o benchmarks/results/cpu-int8-DATE.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def logit_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = out.float() - ref.float()
    return {"max_abs": round(diff.abs().max().item(), 5),
            "rel_rms": round((diff.pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()).item(), 5),
            "ref_max_abs": round(ref.float().abs().max().item(), 3),
            "argmax_agreement": round((out.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4)}


def interleaved(runs: dict, rounds: int, setup: dict | None = None, per_round: int = 2) -> dict:
    """Median ms of each ``runs[name]()`` over ``rounds`` rounds that visit every run in turn (each
    round: ``setup[name]()`` untimed, one warm-up call, then ``per_round`` timed calls)."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if setup and name in setup:
                setup[name]()
            run()
            for _ in range(per_round):
                t = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - t) * 1e3)
    return {name: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2), "n": len(v)}
            for name, v in times.items()}


# -- 1. the candidate ops ------------------------------------------------------------------------

def amused_linear_shapes(largest: int) -> dict:
    """(K, N) -> count of aMUSEd-256's linears, the ``largest`` shapes by K·N (built on the meta device)."""
    from musefast.models.uvit import UVit2D, UVit2DConfig

    with torch.device("meta"):
        model = UVit2D(UVit2DConfig(sample_size=16))
    shapes: dict = {}
    for m in model.modules():
        if isinstance(m, nn.Linear):
            shapes[(m.in_features, m.out_features)] = shapes.get((m.in_features, m.out_features), 0) + 1
    return dict(sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1])[:largest])


def op_candidates(shapes: dict, rounds: int) -> dict:
    """shapes: (K, N) -> how many linears of the model have it. Returns per-shape medians."""
    from musefast.cpu import int8

    out = {}
    rows = 512
    for (k, n), count in shapes.items():
        torch.manual_seed(0)
        x = torch.randn(rows, k)
        lin = nn.Linear(k, n, bias=False).requires_grad_(False)
        w = lin.weight
        w32 = torch.ops.mkldnn._reorder_linear_weight(w, rows)
        w16 = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows)
        x16 = x.bfloat16()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127)
        fbgemm = torch.ops.quantized.linear_prepack(
            torch.quantize_per_channel(w, scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8), None)
        woq_weight, woq_scale = q.to(torch.int8), scale.bfloat16()
        int8.apply(lin)
        runs = {
            "fp32 oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(x, w32, None, "none", [], ""),
            "bf16 oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(x16, w16, None, "none", [], ""),
            "(a) fbgemm linear_dynamic, per-tensor": lambda: torch.ops.quantized.linear_dynamic(x, fbgemm, False),
            "(b) oneDNN qlinear, per-token (musefast)": lambda: int8.linear(lin, x),
            "(c) weight-only int8, bf16 inputs": lambda: torch.ops.aten._weight_int8pack_mm(x16, woq_weight, woq_scale),
        }
        with torch.no_grad():
            out[f"{rows}x{k}->{n} (x{count})"] = interleaved(runs, rounds, per_round=5)
    return out


# -- 2. aMUSEd-256, random weights -------------------------------------------------------------

def amused(rounds: int) -> dict:
    """Two phases to bound memory on a shared machine (one 600M-parameter model, converted to
    bf16 in place between them): fp32 engine vs int8 with the rest in fp32, interleaved; then
    bf16 engine vs int8 with the rest in bf16, interleaved. Logit errors are against the fp32
    plain forward."""
    from musefast.cpu import int8, linear as cpu
    from musefast.models.uvit import UVit2D, UVit2DConfig

    torch.manual_seed(0)
    model = UVit2D(UVit2DConfig(sample_size=16)).eval().requires_grad_(False)
    with torch.no_grad():  # norm weights of 1 and GRN zeros would make every layer alike
        for name, p in model.named_parameters():
            if "norm" in name or "gamma" in name or "beta" in name:
                p.add_(0.1 * torch.randn_like(p))
    cfg = model.config
    B, side = 2, cfg.sample_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.codebook_size, (B, side, side), generator=g)
    tokens[:, ::2] = cfg.vocab_size - 1  # half the rows masked, as mid-generation
    hidden = torch.randn(B, 77, cfg.encoder_hidden_size, generator=g)
    pooled = torch.randn(B, cfg.cond_embed_dim, generator=g)
    micro = torch.tensor([256.0, 256, 0, 0, 6])
    errors, timing = {}, {}
    engine = lambda: (int8.remove(model), cpu.apply(model))  # noqa: E731 - one cache at a time
    quantized = lambda: int8.apply(model)  # noqa: E731 - drops the engine's packed weights
    with torch.no_grad():
        ref = model(tokens, context=model.prepare_context(hidden, pooled, micro)).float()
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            ctx = model.prepare_context(hidden.to(dtype), pooled.to(dtype), micro)
            name = str(dtype).removeprefix("torch.")
            run = lambda: model(tokens, context=ctx)  # noqa: E731
            for label, install in ((f"{name} engine", engine), (f"int8, rest {name}", quantized)):
                install()
                errors[label] = logit_error(run().float(), ref)
            timing.update(interleaved({f"{name} engine": run, f"int8, rest {name}": run}, rounds,
                                      setup={f"{name} engine": engine, f"int8, rest {name}": quantized}))
    return {"params": sum(p.numel() for p in model.parameters()), "batch": B,
            "linears": sum(isinstance(m, nn.Linear) for m in model.modules()),
            "logit_error_vs_fp32_plain": errors, "forward": timing}


# -- 3. the demo model ---------------------------------------------------------------------------

def demo(count: int, seed: int, rounds: int, batch_size: int) -> dict:
    """The demo model in fp32 vs int8 and vs bf16 (what ``dtype="auto"`` gives a large model on a
    bf16 CPU; the demo itself is small enough that "auto" keeps it fp32): logit error, token
    agreement of a 12-step generation, checker accuracy, forward time."""
    import musefast
    from musefast.demo_data.evaluate import evaluate_run, held_out_captions

    pipes = {"fp32": musefast.load("demo", dtype=torch.float32),
             "int8": musefast.load("demo", dtype=torch.float32, quantize="int8"),
             "bf16": musefast.load("demo", dtype=torch.bfloat16)}
    fp32 = pipes["fp32"]
    captions = held_out_captions(count, seed=seed)
    with torch.no_grad():
        cond, _ = fp32.encode_prompt(captions[:16])
        t = fp32.transformer
        g = torch.Generator().manual_seed(seed)
        side = t.config.grid_size
        n = cond.hidden.shape[0]
        tokens = torch.randint(0, t.config.codebook_size, (n, side, side), generator=g)
        tokens[torch.rand(n, side, side, generator=g) < 0.5] = t.mask_token_id
        ref = fp32.transformer(tokens, cond.hidden, cond.mask)
        errors = {name: logit_error(pipes[name].transformer(tokens, cond.hidden.to(next(pipes[name].transformer.parameters()).dtype),
                                                            cond.mask).float(), ref)
                  for name in ("int8", "bf16")}
        ctx32 = fp32.transformer.prepare_context(cond.hidden[:2], cond.mask[:2])
        ctx8 = pipes["int8"].transformer.prepare_context(cond.hidden[:2], cond.mask[:2])
        timing = interleaved({"fp32 engine": lambda: fp32.transformer(tokens[:2], context=ctx32),
                              "int8": lambda: pipes["int8"].transformer(tokens[:2], context=ctx8)}, rounds, per_round=10)
    runs, toks = {}, {}
    for name, pipe in pipes.items():
        runs[name], toks[name] = evaluate_run(pipe, captions, seed=seed, batch_size=batch_size, num_steps=12)
    agreement = {name: round((toks["fp32"] == toks[name]).float().mean().item(), 4) for name in ("int8", "bf16")}
    identical = {name: int((toks["fp32"] == toks[name]).flatten(1).all(1).sum()) for name in ("int8", "bf16")}
    return {"params": sum(p.numel() for p in fp32.transformer.parameters()), "count": count, "seed": seed,
            "steps": 12, "logit_error_vs_fp32": errors, "forward_batch2": timing,
            "token_agreement": agreement, "images_with_identical_tokens": identical, "checker_cfg": runs}


def machine() -> dict:
    from musefast.cpu import linear as cpu

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "?")
    return {"cpu": model, "isa": cpu.cpu_isa(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg_1_5_15": list(os.getloadavg()), "logical_cpus": os.cpu_count()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=64, help="held-out captions of the demo checker run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    p.add_argument("--parts", default="ops,amused,demo", help="comma-separated subset of ops,amused,demo")
    p.add_argument("-o", "--output", default=None,
                   help="JSON report (default: benchmarks/results/cpu-int8-<date>.json)")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"ops", "amused", "demo"}:
        p.error(f"unknown parts {sorted(parts - {'ops', 'amused', 'demo'})}")
    from musefast.cpu import int8

    int8.check("int8")
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"cpu-int8-{datetime.date.today()}.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit.strip(), "machine_before": machine()}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    if "amused" in parts:
        report["amused-256"] = amused(args.rounds)
        save()
        print(json.dumps(report["amused-256"], indent=2), flush=True)
    if "ops" in parts:
        report["op_candidates"] = op_candidates(amused_linear_shapes(largest=4), args.rounds)
        save()
        print(json.dumps(report["op_candidates"], indent=2), flush=True)
    if "demo" in parts:
        report["demo"] = demo(args.count, args.seed, args.rounds, args.batch_size)
        save()
        print(json.dumps(report["demo"], indent=2), flush=True)
    report["machine_after"] = machine()
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
