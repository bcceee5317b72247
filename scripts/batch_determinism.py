"""Measure how often batch size or row order changes a token in `musefast batch`.

Generates N demo captions with batch sizes 1, 8 and 64 and in shuffled order (batch 8), and
counts rows whose tokens differ from the batch-size-1 run. Prints a JSON report.

    python scripts/batch_determinism.py --rows 512
    OMP_NUM_THREADS=2 python scripts/batch_determinism.py --rows 512 --compare tokens-1thread.json

``--tokens FILE`` writes the batch-size-1 run's token hashes; ``--compare FILE`` counts the rows
whose tokens differ from such a file (another thread count, another ISA cap).
"""
from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np


def captions(n: int, seed: int = 0) -> list[str]:
    from musefast.demo_data import shapes

    rng = np.random.default_rng(seed)
    return [shapes.caption(shapes.sample_scene(rng, split="all")) for _ in range(n)]


def tokens_by_id(worker, rows, batch_size):
    from musefast.batch.worker import Done

    out = {}
    for i in range(0, len(rows), batch_size):
        for item in worker.generate(rows[i:i + batch_size]):
            assert isinstance(item, Done), item
            out[item.record["id"]] = item.record["tokens_sha256"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--sizes", default="1,8,64")
    parser.add_argument("--tokens", default=None, help="write the first run's token hashes here (JSON)")
    parser.add_argument("--compare", default=None, help="count rows differing from this --tokens file")
    args = parser.parse_args()
    import musefast
    from musefast.batch.job import make_job
    from musefast.batch.rows import read_rows
    from musefast.batch.worker import Worker

    pipe = musefast.load("demo")
    worker = Worker(pipe, make_job(pipe, "demo"))
    rows = read_rows(captions(args.rows))
    report = {"rows": args.rows}
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = {}
    for size in sizes:
        t = time.perf_counter()
        runs[size] = tokens_by_id(worker, rows, size)
        report[f"batch_{size}_images_per_s"] = round(args.rows / (time.perf_counter() - t), 2)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    runs["shuffled"] = tokens_by_id(worker, shuffled, 8)
    base = runs[sizes[0]]
    for name, run in runs.items():
        report[f"differ_{name}_vs_{sizes[0]}"] = sum(run[k] != base[k] for k in base)
    if args.tokens:
        with open(args.tokens, "w") as f:
            json.dump(base, f)
    if args.compare:
        with open(args.compare) as f:
            other = json.load(f)
        report[f"differ_vs_{args.compare}"] = sum(base[k] != other[str(k)] for k in base)
    import torch

    from musefast.cpu import isa

    report.update(threads=torch.get_num_threads(), isa=isa.record())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
