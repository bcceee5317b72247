"""Batch invariance of the generation engine: a request's tokens against its solo run.

Runs N requests (mixed steps, guidance scales, guidance intervals and negative prompts) one at
a time (max_batch 1, one thread: the reference), then on engines with other ``max_batch``
values, arriving a few per step (so rows at different steps share forwards), at 1 and 2
threads; counts the requests whose tokens differ from the reference. Writes a JSON report.

    python scripts/engine_invariance.py --model demo --requests 500 --out benchmarks/results/x.json
    python scripts/engine_invariance.py --model amused-256 --requests 50 --steps 2,3,4
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_model(name: str):
    """The demo pipeline, or aMUSEd-256's architecture with random weights in the dtype
    ``musefast.load`` would pick here (dtype="auto") and the CPU paths it applies."""
    import musefast

    if name == "demo":
        return musefast.load("demo")
    sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
    from amused_random import random_amused

    from musefast.pipelines.loading import resolve_dtype, runnable

    dtype = resolve_dtype("auto", None, torch.float32, 600_000_000) or torch.float32
    pipe = random_amused(name, "cpu", dtype)
    runnable(pipe.transformer)
    return pipe


def make_requests(n: int, steps: list[int], seed: int = 0):
    import numpy as np

    from musefast.demo_data import shapes
    from musefast.generation import Request

    rng = np.random.default_rng(seed)
    guidance = [1.0, 1.5, 3.0, 10.0]
    intervals = [None, None, (0.0, 0.5), (0.25, 1.0)]
    negatives = [None, None, "a blurry picture"]
    return [Request(prompt=shapes.caption(shapes.sample_scene(rng, split="all")), seed=int(rng.integers(2**62)),
                    num_steps=int(rng.choice(steps)), guidance_scale=guidance[i % 4],
                    guidance_interval=intervals[(i // 4) % 4], negative_prompt=negatives[i % 3])
            for i in range(n)]


def run(pipe, requests, *, max_batch: int, threads: int, per_step: int) -> tuple[list[str], dict]:
    """Token hashes of ``requests`` on an engine; ``per_step`` requests join before each step."""
    from musefast.generation import Engine

    torch.set_num_threads(threads)
    engine = Engine(pipe, max_batch=max_batch, max_queue=len(requests))
    start = time.perf_counter()
    handles, pending = [], list(requests)
    while pending or engine.busy:
        for _ in range(min(per_step, len(pending))):
            handles.append(engine.submit(pending.pop(0)))
        engine.step()
    seconds = time.perf_counter() - start
    hashes = [hashlib.sha256(h.result().cpu().numpy().tobytes()).hexdigest() for h in handles]
    return hashes, {"max_batch": max_batch, "threads": threads, "arrivals_per_step": per_step,
                    "forwards": engine.forwards, "seconds": round(seconds, 2),
                    "images_per_s": round(len(requests) / seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", choices=["demo", "amused-256", "tiny"])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--steps", default="2,4,8,12", help="step counts the requests draw from")
    parser.add_argument("--max-batch", default="4,16", help="engine sizes compared with the solo runs")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--solo-once", action="store_true", help="no solo run at the other thread counts")
    parser.add_argument("--out", default=None, help="JSON report path (default: print)")
    args = parser.parse_args()
    from musefast import __version__
    from musefast.cpu.linear import cpu_isa

    pipe = load_model(args.model)
    requests = make_requests(args.requests, [int(s) for s in args.steps.split(",")])
    run(pipe, requests[:2], max_batch=2, threads=1, per_step=2)  # warm-up: backend self-checks, first calls
    reference, solo = run(pipe, requests, max_batch=1, threads=1, per_step=1)
    runs = [dict(solo, differ=0, role="reference (solo)")]
    for threads in (int(t) for t in args.threads.split(",")):
        for max_batch in (int(b) for b in args.max_batch.split(",")):
            hashes, info = run(pipe, requests, max_batch=max_batch, threads=threads, per_step=max(1, max_batch // 4))
            info["differ"] = sum(a != b for a, b in zip(hashes, reference))
            runs.append(info)
            print(json.dumps(info), file=sys.stderr)
        if threads != 1 and not args.solo_once:
            hashes, info = run(pipe, requests, max_batch=1, threads=threads, per_step=1)
            info["differ"] = sum(a != b for a, b in zip(hashes, reference))
            runs.append(info)
    report = {
        "what": "requests whose tokens differ from their solo run (max_batch 1, 1 thread)",
        "model": args.model, "dtype": str(getattr(pipe, "dtype", "")), "requests": args.requests,
        "steps": args.steps, "runs": runs, "cpu": platform.processor() or platform.machine(),
        "cpu_isa": cpu_isa(), "torch": torch.__version__, "musefast": __version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
