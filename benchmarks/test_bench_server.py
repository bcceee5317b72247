"""Load test of ``musefast serve``: C concurrent ``openai``-SDK clients sending R requests to a
server process on 127.0.0.1 (demo model), against, in the same run, (a) the same requests run
one after another through the pipeline in this process (the anchor: no server at all) and
(b) the same load on the same server with ``--max-batch 1`` (one request at a time).

Each client sends its next request when the previous one is answered (a closed loop: C requests
are always outstanding). Recorded per setting: images/s (R over the wall time from the first
request to the last answer), p50/p95/p99 latency (request sent -> answer parsed), errors. The
anchor's latency is its per-request run time (it has no queue).

``MUSEFAST_SERVER_BENCH=full`` runs the committed sizes (32 requests, 8 clients, the demo's
12 steps); the default is a short CI pass (8 requests, 4 clients, 4 steps).
"""
from __future__ import annotations

import base64
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tests.serving import PROMPTS, start_process  # noqa: E402

FULL = os.environ.get("MUSEFAST_SERVER_BENCH", "short") == "full"
REQUESTS, CLIENTS, STEPS, MAX_BATCH = (32, 8, 12, 16) if FULL else (8, 4, 4, 8)


def _cases():
    return [(PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(REQUESTS)]


def load(url: str) -> dict:
    """CLIENTS threads, each with its own SDK client, draining a shared list of requests."""
    cases, lock, latencies, errors = list(_cases()), threading.Lock(), [], []

    def client_loop():
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        while True:
            with lock:
                if not cases:
                    return
                prompt, seed = cases.pop(0)
            sent = time.perf_counter()
            try:
                result = client.images.generate(prompt=prompt, extra_body={"seed": seed, "num_inference_steps": STEPS})
                base64.b64decode(result.data[0].b64_json)
                latencies.append(time.perf_counter() - sent)
            except openai.APIError as exc:
                errors.append(str(exc))

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client_loop) for _ in range(CLIENTS)]:
            future.result()
    wall = time.perf_counter() - start
    return _summary(latencies, wall, errors)


def _summary(latencies, wall, errors) -> dict:
    lat = np.array(latencies)
    return {"images_per_s": len(latencies) / wall, "wall_s": wall, "answered": len(latencies), "errors": len(errors),
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "p99_s": float(np.percentile(lat, 99))}


def pipeline_anchor() -> dict:
    """The same requests, one after another, through the pipeline (PNG-encoded like the server's)."""
    import io

    import torch

    import musefast

    torch.set_num_threads(1)  # as the server: the demo's default
    pipe = musefast.load("demo")
    pipe(PROMPTS[0], seed=0, num_steps=STEPS, progress=False)  # warm-up
    latencies, start = [], time.perf_counter()
    for prompt, seed in _cases():
        t = time.perf_counter()
        image = pipe(prompt, seed=seed, num_steps=STEPS, progress=False)[0]
        image.save(io.BytesIO(), format="PNG")
        latencies.append(time.perf_counter() - t)
    return _summary(latencies, time.perf_counter() - start, [])


def _served(max_batch: int) -> dict:
    process, url, lines = start_process("--max-batch", str(max_batch), "--max-queue", str(REQUESTS))
    try:
        load(url) if FULL else None  # warm-up pass on the full run: first calls, allocator
        return load(url)
    finally:
        process.terminate()
        process.wait(60)


def test_server_under_concurrent_clients(benchmark):
    load_before = os.getloadavg()  # the machine is shared: say how busy it was
    batched = _served(MAX_BATCH)
    one_at_a_time = _served(1)
    anchor = benchmark.pedantic(pipeline_anchor, rounds=1, iterations=1)
    benchmark.extra_info.update(
        requests=REQUESTS, clients=CLIENTS, steps=STEPS, max_batch=MAX_BATCH, model="demo", server_threads=1,
        server=batched, server_max_batch_1=one_at_a_time, pipeline_sequential=anchor,
        throughput_vs_max_batch_1=batched["images_per_s"] / one_at_a_time["images_per_s"],
        throughput_vs_pipeline=batched["images_per_s"] / anchor["images_per_s"],
        p95_vs_max_batch_1=batched["p95_s"] / one_at_a_time["p95_s"],
        load_average_1min=[load_before[0], os.getloadavg()[0]], cpus=os.cpu_count())
    for name, result in (("server", batched), ("max-batch 1", one_at_a_time)):
        print(f"{name}: {result['images_per_s']:.2f} images/s, p50 {result['p50_s']:.3f} s, "
              f"p95 {result['p95_s']:.3f} s, errors {result['errors']}")
    print(f"pipeline one by one: {anchor['images_per_s']:.2f} images/s, p50 {anchor['p50_s']:.3f} s")
    assert batched["errors"] == 0 and one_at_a_time["errors"] == 0
    assert batched["answered"] == one_at_a_time["answered"] == REQUESTS
