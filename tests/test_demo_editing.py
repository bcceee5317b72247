"""The editing cases of the demo model (inpaint / outpaint / mask-free edit) are built right and
scored by the checker; the model-quality figures themselves come from scripts/eval_demo.py."""
import numpy as np
import pytest
import torch

from musefast.demo_data.checker import detect
from musefast.demo_data.editing import KINDS, edit_cases, evaluate_edits, inpaint_cases, outpaint_cases
from musefast.demo_data.shapes import is_held_out, parse_caption


def test_inpaint_cases_hold_the_first_shape_and_mask_the_other_half():
    for case in inpaint_cases(12, seed=3):
        objects = parse_caption(case["prompt"])
        assert len(objects) == 2 and is_held_out(objects)
        found = detect(case["image"]).specs
        assert len(found) == 1 and found[0] in objects
        missing = next(o for o in objects if o != found[0])
        mask = case["mask"] > 0
        assert mask.mean() == 0.5
        # the mask is exactly the half of the missing shape's slot
        ys, xs = np.nonzero(mask)
        half = {"left": xs.max() < 32, "right": xs.min() >= 32, "top": ys.max() < 32, "bottom": ys.min() >= 32}
        assert half[missing.slot]


def test_outpaint_cases_are_the_half_with_the_first_shape():
    for case in outpaint_cases(12, seed=4):
        (side, margin), = case["margins"].items()
        assert margin == 32
        h, w = case["image"].shape[:2]
        assert (h, w) == ((64, 32) if side in ("left", "right") else (32, 64))
        objects = parse_caption(case["prompt"])
        # the crop holds exactly one shape of the scene, and it is the one on the kept side
        kept_side = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[side]
        colours = {o.colour for o in objects if o.slot == kept_side}
        pixels = case["image"].reshape(-1, 3)
        from musefast.demo_data.shapes import COLOURS
        present = {name for name, rgb in COLOURS.items() if (pixels == rgb).all(1).any()}
        assert present == colours


def test_edit_cases_change_only_the_colour():
    cases = edit_cases(14, seed=5)
    colours = set()
    for case in cases:
        before, after = parse_caption(case["source_prompt"]), parse_caption(case["prompt"])
        (b,), (a,) = before, after
        assert (a.shape, a.slot) == (b.shape, b.slot) and a.colour != b.colour
        assert detect(case["image"]).specs == (b,)
        colours.add((b.colour, a.colour))
    assert len(colours) > 3


def test_evaluate_edits_scores_every_kind_on_a_tiny_pipeline():
    from musefast.pipelines.random_init import random_pipeline
    from musefast.training.text import TextTrainConfig, build_text_encoder

    encoder = build_text_encoder(TextTrainConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32), seed=0)
    pipe = random_pipeline("tiny", text_encoder=encoder)
    pipe.settings.num_steps = 2
    report = evaluate_edits(pipe, count=2, seed=0)
    assert set(report) == set(KINDS)
    for result in report.values():
        assert result["n_images"] == 2 and 0.0 <= result["shape"] <= 1.0 and result["seconds"] >= 0
    with pytest.raises(ValueError, match="unknown edit kind"):
        evaluate_edits(pipe, count=1, kinds=("recolour",))
