"""The demo's procedural dataset, its exact checker, and the quality gate of the shipped demo."""
from collections import Counter

import numpy as np
import pytest

from musefast.demo_data import checker, shapes
from musefast.demo_data.shapes import (COLOURS, SHAPES, SLOTS, Scene, ShapesDataset, ShapeSpec, all_combinations,
                                       caption, caption_word_objects, is_held_out, parse_caption, render)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_checker_reads_rendered_scenes_exactly(seed):
    ds = ShapesDataset(seed, split="all")
    for i in range(100):
        image, text, scene = ds[i]
        det = checker.detect(image)
        assert sorted(det.specs) == sorted(scene.objects), (seed, i, text, det)
        assert det.background == scene.background
        assert parse_caption(text) == scene.objects
        assert min(s.shape_iou for s in det.shapes) > 0.9


def test_checker_exact_at_128_pixels_and_for_every_shape_colour_slot():
    rng = np.random.default_rng(0)
    backgrounds = list(shapes.BACKGROUNDS)
    for k, (spec,) in enumerate(all_combinations(1)):  # every (colour, shape, slot), one shape each
        scene = Scene((spec,), backgrounds[k % len(backgrounds)])
        size = 128 if k % 5 == 0 else 64
        assert checker.detect(render(scene, size=size, rng=rng)).specs == scene.objects, (spec, size)


def test_checker_tolerates_pixel_noise():
    ds = ShapesDataset(3, split="all")
    rng = np.random.default_rng(0)
    images, captions, _ = ds.batch(0, 60)
    noisy = np.clip(images.astype(np.float32) + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8)
    result = checker.score(noisy, captions)
    assert result["exact"] == 1.0, result


def test_score_counts_wrong_attributes():
    scene = Scene((ShapeSpec("red", "circle", "left"),), "white")
    image = render(scene)
    assert checker.score([image], ["a red circle on the left"])["exact"] == 1.0
    wrong_colour = checker.score([image], ["a blue circle on the left"])
    assert (wrong_colour["colour"], wrong_colour["shape"], wrong_colour["position"]) == (0.0, 1.0, 1.0)
    wrong_place = checker.score([image], ["a red circle at the top"])
    assert (wrong_place["colour"], wrong_place["shape"], wrong_place["position"]) == (1.0, 1.0, 0.0)
    # a two-shape caption on a one-shape image: one of the two requested shapes is missing
    pair = checker.score([image], ["a red circle on the left of a green square"])
    assert pair["n_shapes"] == 2 and pair["colour"] == 0.5 and pair["count"] == 0.0 and pair["exact"] == 0.0
    blank = np.full((64, 64, 3), 250, dtype=np.uint8)
    empty = checker.score([blank], ["a red circle on the left"])
    assert empty["colour"] == empty["shape"] == empty["position"] == 0.0
    with pytest.raises(ValueError, match="captions"):
        checker.score([image], [])


def test_checker_accepts_pil_tensor_and_float_inputs():
    import torch
    from PIL import Image

    image, text, scene = ShapesDataset(4)[0]
    expected = sorted(scene.objects)
    assert sorted(checker.detect(Image.fromarray(image)).specs) == expected
    assert sorted(checker.detect(image.astype(np.float32) / 255).specs) == expected
    assert sorted(checker.detect(torch.from_numpy(image).permute(2, 0, 1).float() / 255).specs) == expected


def test_every_caption_parses_back_to_its_scene():
    combos = list(all_combinations())
    assert len(combos) == len(COLOURS) * len(SHAPES) * (len(SLOTS) + 2 * len(COLOURS) * len(SHAPES))
    for objs in combos:
        scene = Scene(objs)
        for variant in (0, 1):
            assert parse_caption(caption(scene, variant)) == scene.objects
    assert parse_caption("A Red circle in the center.") == (ShapeSpec("red", "circle", "centre"),)
    assert caption(Scene((ShapeSpec("orange", "ring", "top"),))) == "an orange ring at the top"
    assert caption(Scene((ShapeSpec("red", "cross", "left"), ShapeSpec("blue", "ring", "right"))), 1) == \
        "a blue ring on the right of a red cross"
    for bad in ["a red circle", "a pink circle on the left", "a red circle on the left of", "", "two red circles"]:
        with pytest.raises(ValueError, match="grammar"):
            parse_caption(bad)
    with pytest.raises(ValueError, match="left\\+right"):
        Scene((ShapeSpec("red", "circle", "left"), ShapeSpec("red", "circle", "top")))


def test_caption_word_objects_aligns_words_with_their_shape():
    red_left = ShapeSpec("red", "circle", "left")
    assert caption_word_objects("a red circle on the left") == [red_left] * 6
    blue_right = ShapeSpec("blue", "square", "right")
    for text, first, second in [("A red circle on the left of a blue square.", red_left, blue_right),
                                ("a blue square on the right of a red circle", blue_right, red_left),
                                ("a blue square to the right of a red circle", blue_right, red_left)]:
        assert caption_word_objects(text) == [first] * 3 + [None] * (len(text.split()) - 6) + [second] * 3, text
    # identical shapes: the relation still tells the slots apart
    top, bottom = ShapeSpec("red", "ring", "top"), ShapeSpec("red", "ring", "bottom")
    assert caption_word_objects("a red ring below a red ring") == [bottom] * 3 + [None] + [top] * 3
    assert caption_word_objects("a red ring above a red ring") == [top] * 3 + [None] + [bottom] * 3
    # every generated caption: each named shape is one of the scene's, and the two differ
    for objs in list(all_combinations(2))[::97]:
        for variant in (0, 1):
            per_word = caption_word_objects(caption(Scene(objs), variant))
            assert {per_word[0], per_word[-1]} == set(objs)
    with pytest.raises(ValueError, match="grammar"):
        caption_word_objects("a red circle")


def test_dataset_is_deterministic_and_seed_dependent():
    a, b = ShapesDataset(7), ShapesDataset(7)
    for i in (0, 5, 123):
        ia, ta, sa = a[i]
        ib, tb, sb = b[i]
        assert np.array_equal(ia, ib) and ta == tb and sa == sb
    assert a.captions(10, 20) == [a[i][1] for i in range(10, 30)]
    other = ShapesDataset(8)
    assert any(not np.array_equal(a[i][0], other[i][0]) for i in range(5))


def test_dataset_variety():
    ds = ShapesDataset(0, split="all")
    scenes = [ds.scene(i) for i in range(2000)]
    counts = Counter(len(s.objects) for s in scenes)
    assert 0.4 < counts[2] / len(scenes) < 0.6
    objs = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objs} == set(COLOURS) and {o.shape for o in objs} == set(SHAPES)
    assert {o.slot for o in objs} == set(SLOTS)
    assert {s.background for s in scenes} == set(shapes.BACKGROUNDS)


def test_held_out_split():
    singles = list(all_combinations(1))
    held = [c for c in singles if is_held_out(c)]
    assert 0.1 < len(held) / len(singles) < 0.2
    train = [c[0] for c in singles if not is_held_out(c)]
    # every pair of attributes still has training examples
    for a, b in (("colour", "shape"), ("colour", "slot"), ("shape", "slot")):
        seen = {(getattr(o, a), getattr(o, b)) for o in train}
        assert len(seen) == len({(getattr(c[0], a), getattr(c[0], b)) for c in singles}), (a, b)
    pairs = list(all_combinations(2))
    assert 0.1 < sum(map(is_held_out, pairs)) / len(pairs) < 0.2
    train_ds, held_ds = ShapesDataset(0, split="train"), ShapesDataset(0, split="held_out")
    assert not any(is_held_out(train_ds.scene(i)) for i in range(500))
    assert all(is_held_out(held_ds.scene(i)) for i in range(200))
    # the split ignores the phrasing and background
    scene = held_ds.scene(0)
    assert is_held_out(Scene(scene.objects, "black")) and is_held_out(parse_caption(caption(scene, 1)))


# The demo model's quality gate, CI size: the gate itself is colour 0.95 / shape 0.90 / position 0.85
# with CFG on 200 held-out captions (the shipped model: 0.993 / 0.953 / 0.993 in
# docs/demo_eval.json); here 64 captions (99 shapes, so one shape is one point) against
# thresholds 3 points lower. Measured on these 64: 0.980 / 0.949 / 0.980.
CI_GATE = {"colour": 0.92, "shape": 0.87, "position": 0.82}
CI_GATE_IMAGES = 64
# Edits (8 cases per kind) measured 1.00 / 1.00 / 1.00; on 64 cases per kind the shipped model scores
# 1.00 / 0.906 / 1.00 at worst over inpaint, outpaint and edit (docs/demo_eval.json).
EDIT_FLOORS = {"colour": 0.9, "shape": 0.85, "position": 0.9}


def _demo_or_skip():
    from musefast.pipelines.demo import DEMO_FOLDER

    if not (DEMO_FOLDER / "model_index.json").is_file():
        pytest.skip("the demo model is not shipped in this checkout")
    import musefast

    return musefast.load("demo")


def test_demo_model_quality_gate_ci_size():
    from musefast.demo_data.evaluate import evaluate

    report = evaluate(_demo_or_skip(), count=CI_GATE_IMAGES, runs=("cfg",))
    result = report["runs"]["cfg"]
    assert result["n_images"] == CI_GATE_IMAGES and result["guidance_scale"] > 1  # with CFG
    for key, threshold in CI_GATE.items():
        assert result[key] >= threshold, (key, result)


def test_demo_model_editing_floor():
    """Inpaint a shape into an empty half, outpaint the other half, recolour without a mask."""
    from musefast.demo_data.editing import evaluate_edits

    report = evaluate_edits(_demo_or_skip(), count=8, seed=0)
    for kind, result in report.items():
        for key, floor in EDIT_FLOORS.items():
            assert result[key] >= floor, (kind, key, result)


def test_demo_model_is_small_and_offline():
    from musefast.pipelines.demo import DEMO_FOLDER

    pipe = _demo_or_skip()
    weights = sum(f.stat().st_size for f in DEMO_FOLDER.rglob("*.safetensors"))
    assert weights <= 25 * 1024 * 1024
    assert pipe.output_size == 64
