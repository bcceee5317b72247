"""Where a ``musefast serve`` process spends its time under 8 concurrent clients: the demo model,
``--max-batch 16`` and ``--max-batch 1``, each with streamed requests (one preview) and plain
ones. For every pass it reads the server's ``/metrics`` before and after: engine step seconds
(the batched forwards and sampling, not the decodes), steps, and images per forward.

    python scripts/server_load_breakdown.py [--out FILE.json]

It reuses the load of benchmarks/test_bench_server.py (32 requests, 12 steps, after a warm-up
pass); needs the serve extra and ``openai``.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

REQUESTS, STEPS = 32, 12
COUNTERS = ("musefast_step_seconds_sum", "musefast_step_seconds_count", "musefast_rows_per_forward_sum",
            "musefast_rows_per_forward_count")


def counters(url: str) -> dict:
    import httpx

    text = httpx.get(url + "/metrics").text
    return {name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1)) for name in COUNTERS}


def plain_load(bench, url: str) -> float:
    """The benchmark's closed loop without streaming -> images/s."""
    import openai

    cases, lock, answered = list(bench._cases(REQUESTS)), threading.Lock(), []

    def client_loop():
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                if not cases:
                    return
                prompt, seed = cases.pop(0)
            result = client.images.generate(prompt=prompt, extra_body={"seed": seed, "num_inference_steps": STEPS})
            base64.b64decode(result.data[0].b64_json)
            answered.append(1)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(bench.CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(answered) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    os.environ["MUSEFAST_SERVER_BENCH"] = "full"  # 8 clients
    import test_bench_server as bench

    from tests.serving import start_process

    rows = []
    for max_batch in (16, 1):
        process, url, _ = start_process("demo", "--max-batch", str(max_batch), "--max-queue", str(REQUESTS),
                                        "--threads", "1")
        try:
            bench.load(url, REQUESTS, STEPS)  # warm-up
            for kind in ("streamed", "plain"):
                before, start = counters(url), time.perf_counter()
                streamed = kind == "streamed"
                rate = bench.load(url, REQUESTS, STEPS)["images_per_s"] if streamed else plain_load(bench, url)
                wall, after = time.perf_counter() - start, counters(url)
                d = {name: after[name] - before[name] for name in COUNTERS}
                row = {"max_batch": max_batch, "requests": kind, "images_per_s": rate, "wall_s": wall,
                       "engine_step_s": d["musefast_step_seconds_sum"], "steps": d["musefast_step_seconds_count"],
                       "images_per_forward": d["musefast_rows_per_forward_sum"] / d["musefast_rows_per_forward_count"],
                       "load_average_1min": os.getloadavg()[0]}
                row["ms_per_image_step"] = 1000 * row["engine_step_s"] / row["steps"] / row["images_per_forward"]
                rows.append(row)
                print(f"--max-batch {max_batch}, {kind}: {rate:.2f} images/s; engine stepping "
                      f"{row['engine_step_s']:.2f} of {wall:.2f} s; {row['images_per_forward']:.2f} images per "
                      f"forward, {row['ms_per_image_step']:.1f} ms per image-step; load {row['load_average_1min']:.1f}",
                      flush=True)
        finally:
            process.terminate()
            process.wait(60)
    if args.out:
        import datetime
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        summary = {"date": date, "commit": commit, "model": "demo", "clients": bench.CLIENTS, "requests": REQUESTS,
                   "steps": STEPS, "server_threads": 1, "cpus": os.cpu_count(), "passes": rows}
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
