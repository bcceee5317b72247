"""The acceptance check of `musefast batch` on the demo model, end to end through the CLI:

1. N rows in-process and with --ray --workers 2 give the same tokens (and PNG bytes);
2. a run SIGKILLed mid-way and re-run gives N manifest lines, N PNGs, no duplicate id, every
   sha256 matching its file and the uninterrupted run.

    python scripts/batch_done_when.py --rows 200 --work /tmp/done_when
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def manifest(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    ids = [r["id"] for r in lines]
    return {"lines": len(lines), "unique_ids": len(set(ids)), "pngs": len(list((out / "images").glob("*.png"))),
            "sha_ok": all(hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() == r["sha256"] for r in lines),
            "tokens": {r["id"]: r["tokens_sha256"] for r in lines}, "sha": {r["id"]: r["sha256"] for r in lines}}


def batch(prompts: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "musefast.cli", "batch", str(prompts), "-o", str(out), "-q", *extra]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--work", default="/tmp/musefast_done_when")
    args = parser.parse_args()
    from musefast.demo_data import shapes
    import numpy as np

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(1)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(shapes.caption(shapes.sample_scene(rng, split="all")) for _ in range(args.rows)))
    report = {"rows": args.rows}
    t = time.time()
    subprocess.run(batch(prompts, work / "local"), check=True)
    report["local_s"] = round(time.time() - t, 1)
    local = manifest(work / "local")
    t = time.time()
    subprocess.run(batch(prompts, work / "ray", "--ray", "--workers", "2", "--cpus-per-worker", "1"), check=True)
    report["ray_2_actors_s"] = round(time.time() - t, 1)
    ray = manifest(work / "ray")
    report["ray_tokens_equal"] = ray["tokens"] == local["tokens"]
    report["ray_png_bytes_equal"] = ray["sha"] == local["sha"]
    proc = subprocess.Popen(batch(prompts, work / "killed"))
    target = args.rows // 2
    m = work / "killed" / "manifest.jsonl"
    while proc.poll() is None and not (m.exists() and len(m.read_bytes().splitlines()) >= target):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    report["lines_when_killed"] = len(m.read_bytes().splitlines())
    subprocess.run(batch(prompts, work / "killed"), check=True)
    killed = manifest(work / "killed")
    report.update({f"resumed_{k}": v for k, v in killed.items() if k not in ("tokens", "sha")})
    report["resumed_equals_uninterrupted"] = killed["sha"] == local["sha"] and killed["tokens"] == local["tokens"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
