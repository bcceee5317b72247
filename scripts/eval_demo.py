#!/usr/bin/env python
"""Quality gate of the demo model: generate images from held-out captions and score
them with the programmatic checker, with classifier-free guidance, without it, and on the
reference backend. Writes a JSON report.

    python scripts/eval_demo.py --model demo --count 200 -o eval_demo.json
    python scripts/eval_demo.py --model path/to/pipeline --count 32 --runs cfg
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help='"demo" (the embedded model) or a pipeline folder')
    p.add_argument("--count", type=int, default=200, help="number of held-out captions (images per run)")
    p.add_argument("--seed", type=int, default=0, help="caption and sampling seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale of the cfg runs (default: the pipeline's)")
    p.add_argument("--runs", default="cfg,no_cfg,reference,inpaint,outpaint,edit",
                   help="comma-separated subset of cfg,no_cfg,reference,inpaint,outpaint,edit")
    p.add_argument("--edit-count", type=int, default=64, help="cases per editing run (inpaint, outpaint, edit)")
    p.add_argument("--grid", default=None, help="also save the first 32 images of the cfg run as a PNG grid")
    p.add_argument("--edit-grid", default=None, help="also save inpaint/outpaint/edit examples (input | output) as a PNG")
    p.add_argument("-o", "--output", default="eval_demo.json", help="JSON report path")
    return p


def save_grid(pipe, count: int, seed: int, batch_size: int, path: str, **call_kw) -> None:
    import numpy as np
    from PIL import Image

    from musefast.demo_data.evaluate import generate_tokens, held_out_captions

    captions = held_out_captions(min(count, 32), seed=seed)
    images = pipe.decode(generate_tokens(pipe, captions, seed=seed, batch_size=batch_size, **call_kw))
    arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    cols = 8
    rows = -(-len(arr) // cols)
    H, W = arr.shape[1:3]
    grid = np.full((rows * H, cols * W, 3), 255, dtype=np.uint8)
    for i, a in enumerate(arr):
        grid[(i // cols) * H:(i // cols + 1) * H, (i % cols) * W:(i % cols + 1) * W] = a
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    Path(path).with_suffix(".txt").write_text("\n".join(captions) + "\n")


def save_edit_grid(pipe, seed: int, path: str, per_kind: int = 4) -> None:
    """A PNG of editing examples: per kind, ``per_kind`` rows of (input, output); the prompts
    go to a .txt beside it."""
    import numpy as np
    from PIL import Image

    from musefast.demo_data.editing import CASES, KINDS, run_case

    size = pipe.output_size
    rows, lines = [], []
    for kind in KINDS:
        for i, case in enumerate(CASES[kind](per_kind, seed=seed, size=size)):
            canvas = np.full((size, size, 3), 255, dtype=np.uint8)
            src = case["image"]
            if kind == "outpaint":  # show the crop where it sits in the grown canvas
                side = next(iter(case["margins"]))
                y = size - src.shape[0] if side == "top" else 0
                x = size - src.shape[1] if side == "left" else 0
                canvas[y:y + src.shape[0], x:x + src.shape[1]] = src
            else:
                canvas[:] = src
            if kind == "inpaint":  # grey out the repainted region in the input view
                canvas[case["mask"] > 0] = canvas[case["mask"] > 0] // 2 + 64
            out = run_case(pipe, kind, case, seed=seed + i)
            result = (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            gap = np.full((size, 4, 3), 255, dtype=np.uint8)
            rows.append(np.concatenate([canvas, gap, result], axis=1))
            lines.append(f"{kind}: {case['prompt']}")
    grid = np.concatenate([np.pad(r, ((0, 4), (0, 0), (0, 0)), constant_values=255) for r in rows])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    Path(path).with_suffix(".txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import musefast
    from musefast.demo_data.evaluate import evaluate

    if args.count < 1:
        raise SystemExit("--count must be >= 1")
    runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
    pipe = musefast.load(args.model)
    report = evaluate(pipe, count=args.count, seed=args.seed, batch_size=args.batch_size, num_steps=args.steps,
                      guidance_scale=args.guidance, runs=runs, edit_count=args.edit_count)
    report["model"] = str(args.model)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report["runs"].items():
        print(f"{name:10s} g={r['guidance_scale']:<5g} colour {r['colour']:.3f}  shape {r['shape']:.3f}  "
              f"position {r['position']:.3f}  exact {r['exact']:.3f}  ({r['n_images']} images, {r['seconds']} s)")
    if "fast_reference_token_agreement" in report:
        print(f"fast vs reference: {report['fast_reference_token_agreement']:.3f} of images with identical tokens")
    if "gate" in report:
        print("quality gate:", "PASSED" if report["gate"]["passed"] else "FAILED")
    if args.grid:
        kw = {"num_steps": args.steps} if args.steps else {}
        if args.guidance is not None:
            kw["guidance_scale"] = args.guidance
        save_grid(pipe, args.count, args.seed, args.batch_size, args.grid, **kw)
    if args.edit_grid:
        save_edit_grid(pipe, args.seed, args.edit_grid)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
