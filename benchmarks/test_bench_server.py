"""Load test of ``musefast serve``: C concurrent ``openai``-SDK clients sending R requests to a
server process on 127.0.0.1 (1 torch thread), against the same load on the same server with
``--max-batch 1`` (one request at a time) in the same run, the timed passes of the two
alternated; on the demo model also against the same requests run one after another through the
pipeline in this process (the anchor: no server, no previews).

Every request is streamed with ``partial_images=1``, as the web page asks: one preview decoded
mid-way, then the final image. Each client sends its next request when the previous one is
answered (a closed loop: C requests always outstanding). Recorded per setting: images/s (R over
the wall time from the first request to the last answer), p50/p95/p99 latency (request sent ->
``image_generation.completed`` parsed), p50/p95/p99 time to first preview (request sent -> first
``image_generation.partial_image``), errors (an error event or an SDK exception) and lost
requests (a stream that ended with neither an image nor an error); both must be 0. The load
average is recorded before and after each pass (the machine is shared); the figures of a setting
pool its passes.

Models: the demo, and a float32 folder of aMUSEd-256's real architecture with random weights
(scripts/amused_random.py), served as saved (float32: ``musefast serve`` without ``--dtype``),
decoded with few steps: its figures are the server's cost at real size, not images worth
looking at.

``MUSEFAST_SERVER_BENCH=full`` runs the committed sizes (8 clients, 2 timed passes per setting;
demo: 32 requests, its 12 steps, ``--max-batch 16``, after a warm-up pass; aMUSEd-256: 8
requests, 4 steps, ``--max-batch 8``, after one warm-up request); the default is a short CI pass
(4 clients, 1 pass; demo: 8 requests, 4 steps; the tiny U-ViT twin of aMUSEd: 4 requests, 2
steps). ``MUSEFAST_SERVER_BENCH_THREADS=2`` gives each server (and the anchor) 2 torch threads
instead of 1; ``MUSEFAST_SERVER_BENCH_MODELS=demo`` runs only the named cases.
"""
from __future__ import annotations

import base64
import io
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
# torch threads of each server (and of the pipeline anchor): 1 by default; 2 uses both cores here
THREADS = int(os.environ.get("MUSEFAST_SERVER_BENCH_THREADS", "1"))
ONLY = os.environ.get("MUSEFAST_SERVER_BENCH_MODELS")  # e.g. "demo": run only these cases
CLIENTS = 8 if FULL else 4
ROUNDS = 2 if FULL else 1  # timed passes per setting, alternated between the two servers
# model -> (requests, steps, --max-batch, warm-up requests before each timed pass)
CASES = {"demo": (32, 12, 16, 32), "amused-256": (8, 4, 8, 1)} if FULL else \
        {"demo": (8, 4, 8, 0), "tiny-amused": (4, 2, 4, 0)}
PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"


def _cases(count: int):
    return [(PROMPTS[i % len(PROMPTS)], 1000 + i) for i in range(count)]


def _one_request(client, prompt: str, seed: int, steps: int) -> tuple[float | None, float | None, tuple | None]:
    """One streamed request -> (seconds to first preview, seconds to the final image, its size);
    None where the stream ended without it."""
    from PIL import Image

    sent = time.perf_counter()
    first_preview = done = size = None
    stream = client.images.generate(prompt=prompt, stream=True, partial_images=1,
                                    extra_body={"seed": seed, "num_inference_steps": steps})
    for event in stream:
        if event.type == PARTIAL and first_preview is None:
            first_preview = time.perf_counter() - sent
        elif event.type == COMPLETED:
            size = Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size  # a real PNG, not just bytes
            done = time.perf_counter() - sent
    return first_preview, done, size


def load(url: str, count: int, steps: int) -> dict:
    """CLIENTS threads, each with its own SDK client, draining a shared list of ``count`` requests."""
    cases, lock = list(_cases(count)), threading.Lock()
    latencies, previews, sizes, errors, lost = [], [], set(), [], [0]

    def client_loop():
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not cases:
                    return
                prompt, seed = cases.pop(0)
            try:
                first_preview, done, size = _one_request(client, prompt, seed, steps)
            except Exception as exc:  # noqa: BLE001 - an error event, a refused or broken connection: counted
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                if done is None:
                    lost[0] += 1
                    continue
                latencies.append(done)
                sizes.add(size)
                if first_preview is not None:
                    previews.append(first_preview)

    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        for future in [pool.submit(client_loop) for _ in range(CLIENTS)]:
            future.result()
    result = _summary(latencies, time.perf_counter() - start, errors)
    result.update(lost=lost[0], first_error=errors[0] if errors else None,
                  image_sizes=sorted(f"{w}x{h}" for w, h in sizes), previews=len(previews),
                  **_percentiles("first_preview", previews), latencies_s=latencies, first_preview_s=previews)
    return result


def _percentiles(name: str, seconds: list[float]) -> dict:
    if not seconds:
        return {f"{name}_p{q}_s": None for q in (50, 95, 99)}
    return {f"{name}_p{q}_s": float(np.percentile(seconds, q)) for q in (50, 95, 99)}


def _summary(latencies, wall, errors) -> dict:
    return {"images_per_s": len(latencies) / wall, "wall_s": wall, "answered": len(latencies), "errors": len(errors),
            **{k.removeprefix("latency_"): v for k, v in _percentiles("latency", latencies).items()}}


def pipeline_anchor(count: int, steps: int) -> dict:
    """The same requests, one after another, through the pipeline (PNG-encoded like the server's)."""
    import torch

    import musefast

    torch.set_num_threads(THREADS)  # as the servers
    pipe = musefast.load("demo")
    pipe(PROMPTS[0], seed=0, num_steps=steps, progress=False)  # warm-up
    latencies, start = [], time.perf_counter()
    for prompt, seed in _cases(count):
        t = time.perf_counter()
        image = pipe(prompt, seed=seed, num_steps=steps, progress=False)[0]
        image.save(io.BytesIO(), format="PNG")
        latencies.append(time.perf_counter() - t)
    return _summary(latencies, time.perf_counter() - start, [])


def _measure(model: str, count: int, steps: int, max_batch: int, warmup: int) -> dict:
    """Both servers up at once (the idle one waits on its engine thread, using no CPU), their timed
    passes alternated ROUNDS times (batched, one at a time, batched, ...) so that a change in the
    shared machine's load falls on both; -> per setting, the rounds and their pooled figures."""
    servers = {}
    try:
        for name, batch in (("server", max_batch), ("server_max_batch_1", 1)):
            servers[name] = start_process(model, "--max-batch", str(batch), "--max-queue", str(count),
                                          "--threads", str(THREADS))
            if warmup:  # first calls, allocator, the batch shapes of the timed passes
                load(servers[name][1], warmup, steps)
        rounds = {name: [] for name in servers}
        for _ in range(ROUNDS):
            for name, (_, url, _) in servers.items():
                load_before = os.getloadavg()[0]
                result = load(url, count, steps)
                result["load_average_1min"] = [load_before, os.getloadavg()[0]]
                rounds[name].append(result)
        return {name: _pooled(results) for name, results in rounds.items()}
    finally:
        for process, _, _ in servers.values():
            process.terminate()
            process.wait(60)


def _pooled(rounds: list[dict]) -> dict:
    """The rounds of one setting as one sample: images/s over the summed wall time, percentiles
    over every request's latency."""
    latencies = [s for r in rounds for s in r["latencies_s"]]
    result = _summary(latencies, sum(r["wall_s"] for r in rounds), [None] * sum(r["errors"] for r in rounds))
    result.update(lost=sum(r["lost"] for r in rounds), previews=sum(r["previews"] for r in rounds),
                  first_error=next((r["first_error"] for r in rounds if r["first_error"]), None),
                  image_sizes=sorted({size for r in rounds for size in r["image_sizes"]}),
                  **_percentiles("first_preview", [s for r in rounds for s in r["first_preview_s"]]),
                  load_average_1min=[rounds[0]["load_average_1min"][0], rounds[-1]["load_average_1min"][1]],
                  rounds=rounds)
    return result


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """``name -> what musefast serve is given``: "demo", or a saved random-weight aMUSEd folder."""
    made = {}

    def get(name: str) -> str:
        if name == "demo":
            return name
        if name not in made:
            import torch

            sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
            from amused_random import random_amused

            folder = tmp_path_factory.mktemp(name)
            # saved in float32: the server loads it as a user's folder, with musefast.load's dtype rule
            random_amused("tiny" if name == "tiny-amused" else name, "cpu", torch.float32).save_pretrained(folder)
            made[name] = str(folder)
        return made[name]

    return get


def _line(name: str, r: dict) -> str:
    preview = r["first_preview_p50_s"]
    return (f"{name}: {r['images_per_s']:.2f} images/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, "
            f"p99 {r['p99_s']:.2f} s, first preview p50 {preview if preview is None else round(preview, 2)} s, "
            f"errors {r['errors']}, lost {r['lost']}")


@pytest.mark.parametrize("model", [m for m in CASES if ONLY is None or m in ONLY.split(",")])
def test_server_under_concurrent_clients(benchmark, model, model_folder):
    count, steps, max_batch, warmup = CASES[model]
    served = model_folder(model)
    load_before = os.getloadavg()  # the machine is shared: say how busy it was
    measured = _measure(served, count, steps, max_batch, warmup)
    batched, one_at_a_time = measured["server"], measured["server_max_batch_1"]
    info = dict(requests=count, rounds=ROUNDS, clients=CLIENTS, steps=steps, max_batch=max_batch,
                warmup_requests=warmup, model=model, weights="demo" if model == "demo" else "random, float32 as saved",
                partial_images=1, server_threads=THREADS,
                server=batched, server_max_batch_1=one_at_a_time,
                throughput_vs_max_batch_1=batched["images_per_s"] / one_at_a_time["images_per_s"],
                p95_vs_max_batch_1=batched["p95_s"] / one_at_a_time["p95_s"])
    print()
    for name, result in (("server", batched), ("max-batch 1", one_at_a_time)):
        print(f"{model} {_line(name, result)}")
    if model == "demo":
        anchor = benchmark.pedantic(pipeline_anchor, args=(count, steps), rounds=1, iterations=1)
        info.update(pipeline_sequential=anchor,
                    throughput_vs_pipeline=batched["images_per_s"] / anchor["images_per_s"])
        print(f"demo pipeline one by one: {anchor['images_per_s']:.2f} images/s, p50 {anchor['p50_s']:.3f} s")
    else:  # the anchor at real size would take minutes: the one-at-a-time server is the reference
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    info.update(load_average_1min=[load_before[0], os.getloadavg()[0]], cpus=os.cpu_count())
    benchmark.extra_info.update(info)
    for result in (batched, one_at_a_time):
        assert result["errors"] == 0, result["first_error"]
        assert result["lost"] == 0
        assert result["answered"] == count * ROUNDS
        assert result["previews"] == count * ROUNDS  # every request showed a preview before its image
        assert len(result["image_sizes"]) == 1
