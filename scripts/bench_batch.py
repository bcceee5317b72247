"""Benchmark `musefast batch` on the demo model: images/s in-process vs Ray with 1 and
2 actors on the same rows, and the cost per image of writing the PNG and its manifest line.

    python scripts/bench_batch.py --rows 96 --json benchmarks/results/batch-cpu.json

Rates are of the generation phase as the runner reports it (for Ray this includes starting
the actors, which each load the model); "wall" adds loading and planning in the driver.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def _captions(n):
    import numpy as np

    from musefast.demo_data import shapes

    rng = np.random.default_rng(0)
    return [shapes.caption(shapes.sample_scene(rng, split="all")) for _ in range(n)]


def write_overhead(rows, reps=3) -> dict:
    """Seconds per image: generating (batch 8) vs encoding + durably writing PNG + manifest line."""
    import musefast
    from musefast.batch.job import make_job
    from musefast.batch.manifest import Manifest
    from musefast.batch.rows import read_rows
    from musefast.batch.sinks import ImageSink
    from musefast.batch.worker import Worker
    from musefast.batch import worker as worker_mod

    pipe = musefast.load("demo")
    worker = Worker(pipe, make_job(pipe, "demo"))
    parsed = read_rows(rows)
    t = time.perf_counter()
    done = [d for i in range(0, len(parsed), 8) for d in worker.generate(parsed[i:i + 8])]
    generate_s = (time.perf_counter() - t) / len(done)
    images = [worker_mod.format_output(pipe.decode(pipe(r.prompt, seed=r.seed, output_type="tokens",
                                                        progress=False)), "pil")[0] for r in parsed[:16]]
    t = time.perf_counter()
    for _ in range(reps):
        for image, d in zip(images, done):
            worker_mod.encode_png(image, {"prompt": d.record["prompt"]})
    encode_s = (time.perf_counter() - t) / (reps * len(images))
    best = float("inf")
    for _ in range(reps):
        folder = Path(tempfile.mkdtemp(dir=os.environ.get("BENCH_DIR")))
        sink, manifest = ImageSink(folder), Manifest(folder / "manifest.jsonl")
        t = time.perf_counter()
        for d in done:
            manifest.append(sink.put(d))
        best = min(best, (time.perf_counter() - t) / len(done))
        shutil.rmtree(folder)
    return {"generate_s_per_image_batch8": round(generate_s, 5), "png_encode_s_per_image": round(encode_s, 5),
            "durable_png_and_manifest_write_s_per_image": round(best, 5),
            "overhead_fraction": round((encode_s + best) / generate_s, 4)}


def runs(rows, tmp: Path) -> dict:
    import ray

    from musefast.batch import batch_generate

    out = {}
    t = time.perf_counter()
    s = batch_generate(rows, tmp / "inproc", batch_size=8, progress=False)
    out["in_process"] = {"images_per_s": s["images_per_s"], "wall_s": round(time.perf_counter() - t, 2)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for workers, cpus in ((1, 2), (2, 1)):
        t = time.perf_counter()
        s = batch_generate(rows, tmp / f"ray{workers}", batch_size=8, ray=True, workers=workers,
                           cpus_per_worker=cpus, progress=False)
        out[f"ray_{workers}_actor"] = {"images_per_s": s["images_per_s"], "wall_s": round(time.perf_counter() - t, 2),
                                       "cpus_per_actor": cpus}
    ray.shutdown()
    ref = {json.loads(line)["id"]: json.loads(line)["tokens_sha256"]
           for line in (tmp / "inproc" / "manifest.jsonl").read_text().splitlines()}
    for name in ("ray1", "ray2"):
        got = {json.loads(line)["id"]: json.loads(line)["tokens_sha256"]
               for line in (tmp / name / "manifest.jsonl").read_text().splitlines()}
        out[f"{name}_tokens_equal_in_process"] = got == ref
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import torch

    import musefast

    rows = _captions(args.rows)
    tmp = Path(tempfile.mkdtemp())
    report = {"rows": args.rows, "model": "demo (12 steps, guidance 1.5)", "torch": torch.__version__,
              "musefast": musefast.__version__, "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "load_average_at_start": os.getloadavg()[0],
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()}
    report.update(runs(rows, tmp))
    report["write_overhead"] = write_overhead(rows[:64])
    report["load_average_at_end"] = os.getloadavg()[0]
    shutil.rmtree(tmp)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
