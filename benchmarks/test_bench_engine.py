"""Engine throughput: requests arriving as a Poisson stream, step-batched on the engine, vs the
same requests run one by one (the anchor), in the same run.

Models: the demo, and aMUSEd-256's architecture with random weights (scripts/amused_random.py;
the dtype ``musefast.load`` picks here). For each arrival rate (a multiple of the one-by-one
service rate) the same arrival times are replayed twice: on an engine (``max_batch`` requests
in flight) and on a one-by-one server (max_batch 1, FIFO). Recorded: images/s (requests over
the span from the first arrival to the last completion) and p50/p95 latency (completion −
arrival), engine and anchor, and their ratios.

``MUSEFAST_ENGINE_BENCH=full`` runs the sizes of the committed results (48 demo requests, 6
aMUSEd-256 requests); the default is a short CI pass (8 demo requests, the tiny U-ViT, one rate).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("MUSEFAST_ENGINE_BENCH", "short") == "full"
CASES = {  # model -> (requests, steps (None: the family's default), max_batch, rates x the one-by-one rate)
    "demo": (48, None, 16, (0.5, 1.0, 2.0, 4.0)) if FULL else (8, 4, 8, (2.0,)),
    "amused-256" if FULL else "tiny-uvit": (6, 3, 6, (1.0, 2.0)) if FULL else (4, 2, 4, (2.0,)),
}


def _load(name: str):
    import musefast

    if name == "demo":
        return musefast.load("demo")
    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
    from amused_random import random_amused

    from musefast.pipelines.loading import resolve_dtype, runnable

    size = "amused-256" if name == "amused-256" else "tiny"
    dtype = resolve_dtype("auto", None, torch.float32, 600_000_000 if size != "tiny" else 0) or torch.float32
    pipe = random_amused(size, "cpu", dtype)
    runnable(pipe.transformer)
    return pipe


def _requests(n: int, steps):
    from musefast.demo_data import shapes
    from musefast.generation import Request

    rng = np.random.default_rng(0)
    return [Request(prompt=shapes.caption(shapes.sample_scene(rng, split="all")), seed=i, num_steps=steps)
            for i in range(n)]


def serve(pipe, requests, arrivals, max_batch: int) -> dict:
    """Replay ``arrivals`` (seconds from the start) on an engine; -> images/s and latencies."""
    from musefast.generation import Engine

    engine = Engine(pipe, max_batch=max_batch, max_queue=len(requests))
    start = time.perf_counter()
    handles, finished, i = [], {}, 0
    while i < len(requests) or engine.busy:
        now = time.perf_counter() - start
        while i < len(requests) and arrivals[i] <= now:
            handles.append(engine.submit(requests[i]))
            i += 1
        if not engine.busy:  # idle until the next request arrives
            time.sleep(max(0.0, arrivals[i] - now))
            continue
        engine.step()
        now = time.perf_counter() - start
        for k, h in enumerate(handles):
            if k not in finished and h.done():
                finished[k] = now
    latency = np.array([finished[k] - arrivals[k] for k in range(len(requests))])
    return {"images_per_s": len(requests) / (max(finished.values()) - arrivals[0]),
            "p50_s": float(np.percentile(latency, 50)), "p95_s": float(np.percentile(latency, 95)),
            "forwards": engine.forwards}


@pytest.mark.parametrize("model", sorted(CASES))
def test_engine_vs_one_by_one(benchmark, model):
    n, steps, max_batch, rates = CASES[model]
    pipe = _load(model)
    requests = _requests(n, steps)
    serve(pipe, requests[:2], [0.0, 0.0], 2)  # warm-up: self-checks, first calls
    sample = requests[:min(n, 8)]
    t = time.perf_counter()
    serve(pipe, sample, [0.0] * len(sample), 1)
    service_s = (time.perf_counter() - t) / len(sample)  # one request alone, on average
    gaps = np.random.default_rng(1).exponential(1.0, n)
    results = {}
    for rate in rates:
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])]) * service_s / rate
        engine = serve(pipe, requests, arrivals, max_batch)
        anchor = serve(pipe, requests, arrivals, 1)
        results[f"{rate}x"] = {"arrivals_per_s": rate / service_s, "engine": engine, "one_by_one": anchor,
                               "throughput_ratio": engine["images_per_s"] / anchor["images_per_s"],
                               "p95_ratio": anchor["p95_s"] / engine["p95_s"]}
    burst = [0.0] * n  # every request at once: the engine's best case
    benchmark.pedantic(lambda: serve(pipe, requests, burst, max_batch), rounds=1, iterations=1)
    benchmark.extra_info.update(model=model, dtype=str(pipe.dtype), requests=n, steps=steps, max_batch=max_batch,
                                one_by_one_service_s=service_s, threads=torch.get_num_threads(), rates=results)
    top = results[f"{rates[-1]}x"]
    assert top["engine"]["forwards"] < top["one_by_one"]["forwards"]  # requests shared forwards
