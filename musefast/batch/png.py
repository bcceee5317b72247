"""PNG bytes with the generation's parameters as text chunks (readable with PIL's ``image.text``)."""
from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

# The parameters written to every image, in this order; values are written as str().
METADATA_KEYS = ("prompt", "negative_prompt", "seed", "num_steps", "guidance_scale", "sampler", "model",
                 "musefast_version", "family", "guidance_schedule", "guidance_interval", "temperature",
                 "choice_temperature", "size", "cache")


def encode_png(image: Image.Image, metadata: dict) -> bytes:
    """``image`` as PNG bytes with one tEXt/iTXt chunk per key of ``metadata`` (None values are
    skipped). No timestamp is written, so the same image and metadata give the same bytes."""
    info = PngInfo()
    for key, value in metadata.items():
        if value is not None:
            info.add_itxt(key, value if isinstance(value, str) else str(value))
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()
