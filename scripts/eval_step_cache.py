#!/usr/bin/env python
"""Step cache and guidance interval: quality and cost against exact decoding.

Two parts, each writing into one JSON report (and a Markdown table beside it):

* ``demo``: the embedded demo model on the held-out captions and seeds of the demo quality table (docs/models.md)
  (``scripts/eval_demo.py``: 200 captions, seed 0, batches of 16, the pipeline's guidance):
  the exact checker's colour / shape / position per setting, token agreement with exact,
  and transformer FLOPs per image (counted by ``torch.utils.flop_counter``);
* ``amused``: the aMUSEd-256 transformer architecture (UVit2D, 22 layers x 1024, 16x16
  tokens, 8192 codes; random weights, float32, CPU), 12 steps, guidance 10, one image:
  counted transformer FLOPs per image and wall time per image, exact and every setting timed
  in the same process, interleaved round by round (the machine is shared: each round's
  ratio to its own exact run is reported, so the spread shows the noise).

    python scripts/eval_step_cache.py --part demo -o docs/step_cache_eval.json
    python scripts/eval_step_cache.py --part amused --settings exact,fast --rounds 2 -o docs/step_cache_eval.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def settings_table() -> dict:
    """name -> pipeline keyword arguments; the sweep is refresh x recompute rule x interval."""
    from musefast.sampling.cache import StepCache

    out = {"exact": {}, "exact+interval": {"guidance_interval": (0.0, 0.5)}}
    rules = {"masked": dict(recompute="masked"), "lowconf0.25": dict(recompute="lowest_confidence", fraction=0.25),
             "lowconf0.1": dict(recompute="lowest_confidence", fraction=0.1),
             "lowconf0.5": dict(recompute="lowest_confidence", fraction=0.5)}
    for refresh in (2, 3, 4, 6):
        for rule, kw in rules.items():
            cache = StepCache(refresh=refresh, **kw)
            out[f"r{refresh}-{rule}"] = {"cache": cache}
            out[f"r{refresh}-{rule}+interval"] = {"cache": cache, "guidance_interval": (0.0, 0.5)}
    out["fast"] = {"cache": "fast"}
    return out


def _describe(kw: dict) -> dict:
    cache = kw.get("cache")
    if cache is not None and not isinstance(cache, str):
        cache = {"refresh": cache.refresh, "recompute": cache.recompute, "fraction": cache.fraction}
    return {"cache": cache, "guidance_interval": kw.get("guidance_interval")}


def _module_flops(counter: FlopCounterMode, name: str) -> int:
    return int(sum(counter.get_flop_counts().get(name, {}).values()))


def run_demo(names: list[str], count: int, batch_size: int) -> dict:
    import musefast
    from musefast.demo_data.checker import score
    from musefast.demo_data.evaluate import generate_tokens, held_out_captions

    table = settings_table()
    pipe = musefast.load("demo")
    captions = held_out_captions(count, seed=0)
    results, exact_tokens = {}, None
    for name in names:
        kw = table[name]
        with FlopCounterMode(display=False) as counter:  # one batch: FLOPs per image
            generate_tokens(pipe, captions[:batch_size], seed=0, batch_size=batch_size, **kw)
        flops = _module_flops(counter, "MuseTransformer") / min(batch_size, count)
        t = time.perf_counter()
        tokens = generate_tokens(pipe, captions, seed=0, batch_size=batch_size, **kw)
        seconds = time.perf_counter() - t
        r = score(list(pipe.decode(tokens)), captions)
        if exact_tokens is None and name == "exact":
            exact_tokens = tokens
        if exact_tokens is not None:
            r["token_agreement"] = float((tokens == exact_tokens).float().mean())
            r["identical_images"] = float((tokens == exact_tokens).flatten(1).all(1).float().mean())
        r.update(transformer_gflops_per_image=flops / 1e9, seconds=round(seconds, 2), **_describe(kw))
        results[name] = r
        print(f"demo {name:28s} colour {r['colour']:.3f} shape {r['shape']:.3f} position {r['position']:.3f} "
              f"agree {r.get('token_agreement', 1):.3f} GFLOP/img {flops / 1e9:.3f} ({seconds:.1f} s)", flush=True)
    return {"count": count, "batch_size": batch_size, "guidance_scale": pipe.settings.guidance_scale,
            "num_steps": pipe.settings.num_steps, "settings": results}


def _amused_model():
    from musefast.models.uvit import UVit2D, UVit2DConfig
    from musefast.sampling import GuidedForward

    torch.manual_seed(0)
    model = UVit2D(UVit2DConfig(sample_size=16)).eval()  # the class defaults are amused-256's
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 77, 768, generator=gen)  # [negative; prompt], CLIP-L/14 widths
    pooled = torch.randn(2, 768, generator=gen)
    both = model.prepare_context(hidden, pooled, torch.tensor([256.0, 256, 0, 0, 6]))
    cond = model.prepare_context(hidden[1:], pooled[1:], torch.tensor([256.0, 256, 0, 0, 6]))
    return model, GuidedForward(model, cond, both, uncond_first=True)


def _amused_call(model, forward, kw: dict):
    from musefast.sampling import MaskGitSampler

    sampler = MaskGitSampler("amused", num_steps=12, guidance_scale=10.0, progress=False, cache=kw.get("cache"),
                             guidance_interval=kw.get("guidance_interval"))
    tokens = torch.full((1, 16, 16), model.mask_token_id)
    with torch.no_grad():
        return sampler(forward, tokens, mask_token_id=model.mask_token_id, seed=0)


def run_amused(names: list[str], rounds: int) -> dict:
    table = settings_table()
    model, forward = _amused_model()
    results = {name: {"seconds": [], **_describe(table[name])} for name in names}
    for r in range(rounds):  # interleaved: every setting once per round
        for name in names:
            # round 0 also counts the FLOPs: the counter's per-op bookkeeping is negligible
            # next to 20-GFLOP forwards (the rounds' ratios show it)
            counter = FlopCounterMode(display=False) if r == 0 else None
            t = time.perf_counter()
            if counter is None:
                _amused_call(model, forward, table[name])
            else:
                with counter:
                    results[name]["tokens"] = _amused_call(model, forward, table[name])
                results[name]["transformer_gflops_per_image"] = _module_flops(counter, "UVit2D") / 1e9
            results[name]["seconds"].append(time.perf_counter() - t)
            print(f"amused round {r} {name:28s} {results[name]['seconds'][-1]:.1f} s "
                  f"GFLOP/img {results[name]['transformer_gflops_per_image']:.1f}", flush=True)
    tokens = {name: res.pop("tokens") for name, res in results.items()}
    exact = results.get("exact")
    for name, res in results.items():
        res["median_seconds"] = statistics.median(res["seconds"]) if res["seconds"] else None
        if exact is not None:
            res["token_agreement"] = float((tokens[name] == tokens["exact"]).float().mean())
            res["flop_reduction"] = exact["transformer_gflops_per_image"] / res["transformer_gflops_per_image"]
            res["speedup_per_round"] = [e / s for e, s in zip(exact["seconds"], res["seconds"])]
            res["speedup_median"] = (statistics.median(res["speedup_per_round"]) if res["speedup_per_round"]
                                     else None)
    return {"model": "aMUSEd-256 architecture (UVit2D defaults, sample_size 16), random weights, float32",
            "num_steps": 12, "guidance_scale": 10.0, "batch": 1, "rounds": rounds,
            "torch_threads": torch.get_num_threads(), "settings": results}


def markdown(report: dict) -> str:
    lines = []
    demo = report.get("demo")
    if demo:
        lines += ["| setting | refresh | recompute | guidance interval | colour | shape | position | token agreement "
                  "| demo GFLOP/img |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in demo["settings"].items():
            c = r["cache"] if isinstance(r["cache"], dict) else {}
            rule = c.get("recompute", "—") + (f" {c['fraction']}" if c.get("recompute") == "lowest_confidence" else "")
            lines.append(f"| {name} | {c.get('refresh', '—')} | {rule} | {r['guidance_interval'] or 'all'} | "
                         f"{r['colour']:.3f} | {r['shape']:.3f} | {r['position']:.3f} | "
                         f"{r.get('token_agreement', 1):.3f} | {r['transformer_gflops_per_image']:.3f} |")
    amused = report.get("amused")
    if amused:
        lines += ["", "| setting (aMUSEd-256 arch, CPU) | GFLOP/img | FLOP reduction | s/img (median) | speedup per round |",
                  "|---|---|---|---|---|"]
        for name, r in amused["settings"].items():
            rounds = ", ".join(f"{s:.2f}" for s in r.get("speedup_per_round", []))
            lines.append(f"| {name} | {r['transformer_gflops_per_image']:.0f} | {r.get('flop_reduction', 1):.2f}x | "
                         f"{r['median_seconds'] or float('nan'):.1f} | {rounds} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["demo", "amused"], required=True)
    p.add_argument("--settings", default=None, help="comma-separated names (default: the whole sweep for demo, "
                                                    "exact,fast for amused)")
    p.add_argument("--count", type=int, default=200, help="held-out captions (demo)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (amused)")
    p.add_argument("-o", "--output", default="docs/step_cache_eval.json",
                   help="JSON report (a part is added to an existing report)")
    args = p.parse_args(argv)
    table = settings_table()
    default = list(table) if args.part == "demo" else ["exact", "fast"]
    names = default if args.settings is None else [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; choose from {list(table)}")
    if "exact" in names:  # the anchor comes first: agreement and ratios are against it
        names = ["exact"] + [n for n in names if n != "exact"]
    out = Path(args.output)
    report = json.loads(out.read_text()) if out.is_file() else {}
    report["torch"] = torch.__version__
    if args.part == "demo":  # settings of an earlier demo run stay (scores are deterministic)
        earlier = report.get("demo", {}).get("settings", {})
        report["demo"] = run_demo(names, args.count, args.batch_size)
        report["demo"]["settings"] = {**earlier, **report["demo"]["settings"]}
    else:
        report["amused"] = run_amused(names, args.rounds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
