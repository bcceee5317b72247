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
    pipe = MusePipeline.from_pretrained(DEMO_FOLDER, device=device, dtype=dtype, quantize=quantize)
    pipe.prompt_check = warn_off_grammar
    return pipe


def warn_off_grammar(prompt: str) -> None:
    """Warn when ``prompt`` is not a caption of the demo's grammar (one or two shapes): the model
    never saw such text, so its image would show a blend of shapes rather than the caption."""
    import re
    import warnings

    from musefast.demo_data.shapes import COLOURS, SHAPES, parse_caption

    grammar_words = {*COLOURS, *SHAPES, *"a an on the left right of to at top bottom in centre center above below".split()}
    if not set(re.findall(r"[a-z]+", prompt.lower())) <= grammar_words:
        return  # unknown words: the text encoder's own warning names them
    try:
        parse_caption(prompt)
    except ValueError as exc:
        warnings.warn(f"the demo model was trained on one- and two-shape captions only: {exc}; the image "
                      "will not follow it", UserWarning, stacklevel=4)
