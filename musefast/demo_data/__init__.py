"""The demo model's world: procedural coloured-shape scenes with captions (:mod:`.shapes`),
an exact programmatic checker of images against captions (:mod:`.checker`), and the
evaluation of a pipeline on held-out captions (:mod:`.evaluate`)."""
from musefast.demo_data.checker import Detection, DetectedShape, check, detect, score
from musefast.demo_data.shapes import (BACKGROUNDS, COLOURS, SHAPES, SLOTS, Scene, ShapesDataset, ShapeSpec,
                                       caption, is_held_out, parse_caption, render, sample_scene)

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "SLOTS", "Detection", "DetectedShape", "Scene", "ShapeSpec",
           "ShapesDataset", "caption", "check", "detect", "is_held_out", "parse_caption", "render", "sample_scene",
           "score"]
