#!/usr/bin/env python
"""Sweep the mask-free edit settings of a pipeline on the held-out edit cases
and write the checker's scores per setting, to choose the defaults stored in model_index.json.

    python scripts/sweep_edit.py --model demo --count 64 -o docs/edit_sweep.json

Each setting edits all cases in one batch (one seed per setting); the chosen default is then
confirmed case by case with ``scripts/eval_demo.py --runs edit`` (the gate's measurement).
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help='"demo" or a pipeline folder')
    p.add_argument("--count", type=int, default=64, help="edit cases (held-out one-shape scenes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", default="25,50,100", help="comma-separated values to try")
    p.add_argument("--fraction", default="0.05,0.1,0.15", help="comma-separated values to try")
    p.add_argument("--guidance", default="1,1.5,2", help="comma-separated values to try")
    p.add_argument("-o", "--output", default="edit_sweep.json")
    args = p.parse_args(argv)

    import musefast
    from musefast.demo_data.checker import score
    from musefast.demo_data.editing import edit_cases

    pipe = musefast.load(args.model)
    cases = edit_cases(args.count, seed=args.seed, size=pipe.image_size)
    images, prompts = [c["image"] for c in cases], [c["prompt"] for c in cases]
    rows = []
    grid = itertools.product(*(map(float, v.split(",")) for v in (args.iterations, args.fraction, args.guidance)))
    for iterations, fraction, guidance in grid:
        t = time.perf_counter()
        out = pipe.edit(images, prompts, iterations=int(iterations), fraction=fraction, guidance_scale=guidance,
                        seed=args.seed, output_type="pt", progress=False)
        row = {"iterations": int(iterations), "fraction": fraction, "guidance_scale": guidance,
               **score(list(out), prompts), "seconds": round(time.perf_counter() - t, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"model": args.model, "count": args.count, "seed": args.seed, "top_k": pipe.settings.edit_top_k,
              "rows": rows}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
