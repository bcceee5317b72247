"""Zero-shot editing on the demo model, checked by the checker.

Three kinds of case, each built from a held-out two- or one-shape scene (deterministic from a
seed) and scored with :func:`musefast.demo_data.checker.score` against the caption of the
scene the edit should produce:

* ``inpaint`` — the scene drawn with its first shape only; the other shape's half of the
  image is masked and repainted with the full two-shape caption ("inpaint a shape into an
  empty region"). The kept half must stay, the new shape must appear where the caption says.
* ``outpaint`` — the half of the scene that holds the first shape, grown back to the full
  canvas with :meth:`~musefast.pipelines.muse.MusePipeline.outpaint` and the full caption.
* ``edit`` — a one-shape scene edited without a mask (Muse §3.3) to another colour:
  "a red circle on the left" → "a green circle on the left". Shape and slot must stay.

Images are rendered exactly as the demo's training images are (fixed shape size, no jitter).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from musefast.demo_data.checker import score
from musefast.demo_data.shapes import COLOURS, Scene, ShapeSpec, ShapesDataset, caption, render

KINDS = ("inpaint", "outpaint", "edit")
# Geometry of the demo model's training images (musefast.training.demo.DemoConfig.dataset).
DEMO_RENDER = dict(size_range=(0.375, 0.375))


def _scenes(count: int, seed: int, objects: int) -> list[Scene]:
    """The first ``count`` held-out scenes of ``seed`` with ``objects`` shapes."""
    data = ShapesDataset(seed, split="held_out", two_object_prob=1.0 if objects == 2 else 0.0)
    return [data.scene(i) for i in range(count)]


def _image(scene: Scene, size: int) -> np.ndarray:
    return render(scene, size=size, rng=None, **DEMO_RENDER)


def _half(slot: str, size: int) -> tuple[slice, slice]:
    """(rows, cols) of the image half that holds ``slot`` (left/right/top/bottom)."""
    h = size // 2
    full = slice(0, size)
    return {"left": (full, slice(0, h)), "right": (full, slice(h, size)),
            "top": (slice(0, h), full), "bottom": (slice(h, size), full)}[slot]


def inpaint_cases(count: int, *, seed: int = 0, size: int = 64) -> list[dict]:
    """``{"image", "mask", "prompt"}``: the first shape only, the other shape's half masked."""
    cases = []
    for scene in _scenes(count, seed, objects=2):
        keep, add = scene.objects
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[_half(add.slot, size)] = 255
        cases.append({"image": _image(Scene((keep,), scene.background), size), "mask": mask,
                      "prompt": caption(scene)})
    return cases


def outpaint_cases(count: int, *, seed: int = 0, size: int = 64) -> list[dict]:
    """``{"image", "margins", "prompt"}``: the half holding the first shape, to be grown back."""
    cases = []
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    for scene in _scenes(count, seed, objects=2):
        keep, add = scene.objects
        rows, cols = _half(keep.slot, size)
        crop = _image(scene, size)[rows, cols]
        cases.append({"image": crop, "margins": {opposite[keep.slot]: size // 2}, "prompt": caption(scene)})
    return cases


def edit_cases(count: int, *, seed: int = 0, size: int = 64) -> list[dict]:
    """``{"image", "prompt", "source_prompt"}``: a one-shape scene recoloured by the prompt
    (each case's new colour is the next palette colour, so every colour pair appears)."""
    names = list(COLOURS)
    cases = []
    for scene in _scenes(count, seed, objects=1):
        (obj,) = scene.objects
        new = ShapeSpec(names[(names.index(obj.colour) + 1) % len(names)], obj.shape, obj.slot)
        cases.append({"image": _image(scene, size), "prompt": caption(Scene((new,), scene.background)),
                      "source_prompt": caption(scene)})
    return cases


@torch.no_grad()
def run_case(pipe, kind: str, case: dict, *, seed: int = 0, **call_kw) -> torch.Tensor:
    """One edit on ``pipe`` -> image (3, H, W) in [0, 1]."""
    common = dict(seed=seed, output_type="pt", progress=False)
    if kind == "inpaint":
        out = pipe.inpaint(case["image"], case["mask"], case["prompt"], **common, **call_kw)
    elif kind == "outpaint":
        out = pipe.outpaint(case["image"], case["prompt"], **case["margins"], **common, **call_kw)
    elif kind == "edit":
        out = pipe.edit(case["image"], case["prompt"], **common, **call_kw)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return out[0]


CASES = {"inpaint": inpaint_cases, "outpaint": outpaint_cases, "edit": edit_cases}


def evaluate_edits(pipe, *, count: int = 32, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> dict:
    """Checker scores of ``count`` cases of each kind -> ``{kind: scores + seconds}`` (the
    unmasked tokens of inpaint/outpaint are kept exactly by the pipeline; the checker sees
    whether the kept shape survived decoding next to the new one)."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown edit kind(s) {sorted(unknown)}; choose from {KINDS}")
    size = pipe.output_size
    report = {}
    for kind in kinds:
        cases = CASES[kind](count, seed=seed, size=size)
        t = time.perf_counter()
        images = [run_case(pipe, kind, c, seed=seed + i) for i, c in enumerate(cases)]
        result = score(images, [c["prompt"] for c in cases])
        result["seconds"] = round(time.perf_counter() - t, 2)
        report[kind] = result
    return report
