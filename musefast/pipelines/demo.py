"""The model embedded in the package (``musefast.load("demo")``)."""
from __future__ import annotations

from pathlib import Path

DEMO_FOLDER = Path(__file__).resolve().parent.parent / "assets" / "demo"


def load_demo(*, device=None, dtype="auto", quantize=None):
    from musefast.pipelines.muse import MusePipeline

    if not (DEMO_FOLDER / "model_index.json").is_file():
        raise FileNotFoundError(
            "the embedded demo model is not part of this build of musefast (it has not been trained "
            f"and shipped yet: {DEMO_FOLDER} is missing). Load a pipeline folder instead: "
            "musefast.load('path/to/folder') or --model path/to/folder."
        )
    return MusePipeline.from_pretrained(DEMO_FOLDER, device=device, dtype=dtype, quantize=quantize)
