"""The demo model's quality gate: generate images from held-out captions and read them back
with the checker.

Three runs with the same captions and seeds: the pipeline's defaults (classifier-free
guidance), guidance off (``guidance_scale=1``), and guidance on with every op forced to the
``reference`` backend. Fast and reference decoding use the same counter-based RNG, so they
should give the same tokens except where floating-point near-ties flip a choice; the report
counts the images whose tokens agree exactly.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

from musefast.demo_data.checker import score
from musefast.demo_data.shapes import ShapesDataset

# The demo model's quality gate (with classifier-free guidance, >= 200 held-out images).
GATE = {"colour": 0.95, "shape": 0.90, "position": 0.85}


def held_out_captions(count: int, *, seed: int = 0) -> list[str]:
    """``count`` captions of held-out combinations (never seen in training), deterministic."""
    return ShapesDataset(seed, split="held_out").captions(0, count)


@contextlib.contextmanager
def forced_backend(backend: str | None):
    """Every op on ``backend`` inside the block (via ``MUSEFAST_BACKEND``); None: no change."""
    if backend is None:
        yield
        return
    saved = os.environ.get("MUSEFAST_BACKEND")
    os.environ["MUSEFAST_BACKEND"] = backend
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MUSEFAST_BACKEND", None)
        else:
            os.environ["MUSEFAST_BACKEND"] = saved


@torch.no_grad()
def generate_tokens(pipe, captions: list[str], *, seed: int = 0, batch_size: int = 16, backend: str | None = None,
                    **call_kw) -> torch.Tensor:
    """Tokens (n, h, w) for ``captions``; batch b uses seed ``seed + b`` (so a run is
    reproducible and independent of the other runs)."""
    out = []
    with forced_backend(backend):
        for b, start in enumerate(range(0, len(captions), batch_size)):
            chunk = captions[start:start + batch_size]
            out.append(pipe(chunk, seed=seed + b, output_type="tokens", progress=False, **call_kw))
    return torch.cat(out)


def evaluate_run(pipe, captions: list[str], *, seed: int = 0, batch_size: int = 16, backend: str | None = None,
                 **call_kw) -> tuple[dict, torch.Tensor]:
    """Generate and score one run -> (scores + ``seconds``, tokens)."""
    t = time.perf_counter()
    tokens = generate_tokens(pipe, captions, seed=seed, batch_size=batch_size, backend=backend, **call_kw)
    seconds = time.perf_counter() - t
    with forced_backend(backend):
        images = pipe.decode(tokens)
    result = score(list(images), captions)
    result["seconds"] = round(seconds, 2)
    return result, tokens


GENERATION_RUNS = ("cfg", "no_cfg", "reference")


def evaluate(pipe, *, count: int = 200, seed: int = 0, batch_size: int = 16, num_steps: int | None = None,
             guidance_scale: float | None = None, runs: tuple[str, ...] = GENERATION_RUNS,
             edit_count: int = 64) -> dict:
    """The quality-gate report of ``pipe`` on ``count`` held-out captions.

    Args:
        runs: any of ``cfg`` (the pipeline's guidance, or ``guidance_scale``), ``no_cfg``
            (guidance 1) and ``reference`` (like ``cfg`` on the reference backend), and the
            editing runs ``inpaint``, ``outpaint``, ``edit`` (:mod:`musefast.demo_data.editing`,
            ``edit_count`` cases each, the pipeline's settings).

    Returns:
        ``{"count", "seed", "settings", "runs": {name: scores}, "gate": {..., "passed"}}``
        plus ``fast_reference_token_agreement`` when both ``cfg`` and ``reference`` ran.
    """
    from musefast.demo_data.editing import KINDS, evaluate_edits

    unknown = set(runs) - set(GENERATION_RUNS) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown run(s) {sorted(unknown)}; choose from {', '.join(GENERATION_RUNS + KINDS)}")
    captions = held_out_captions(count, seed=seed)
    g = pipe.settings.guidance_scale if guidance_scale is None else guidance_scale
    common = dict(seed=seed, batch_size=batch_size, num_steps=num_steps)
    spec = {"cfg": dict(guidance_scale=g), "no_cfg": dict(guidance_scale=1.0),
            "reference": dict(guidance_scale=g, backend="reference")}
    results, tokens = {}, {}
    for name in (r for r in runs if r in GENERATION_RUNS):
        results[name], tokens[name] = evaluate_run(pipe, captions, **common, **spec[name])
        results[name]["guidance_scale"] = spec[name]["guidance_scale"]
    edits = tuple(r for r in runs if r in KINDS)
    if edits:
        for name, result in evaluate_edits(pipe, count=edit_count, seed=seed, kinds=edits).items():
            results[name] = {**result, "guidance_scale": pipe.settings.guidance_scale}
    report = {"count": count, "seed": seed, "num_steps": num_steps or pipe.settings.num_steps,
              "settings": vars(pipe.settings).copy(), "runs": results}
    if "cfg" in tokens and "reference" in tokens:
        same = (tokens["cfg"] == tokens["reference"]).flatten(1).all(1)
        report["fast_reference_token_agreement"] = float(same.float().mean())
    if "cfg" in results:
        passed = {k: results["cfg"][k] >= v for k, v in GATE.items()}
        report["gate"] = {"thresholds": GATE, **passed, "passed": all(passed.values())}
    return report
