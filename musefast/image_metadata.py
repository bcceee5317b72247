"""Generation parameters in a PNG's text chunks, so that an image says how to make it again.

Each parameter is its own ``tEXt`` entry under a ``musefast:`` key (prompt, negative_prompt,
seed, steps, guidance_scale, sampler, model, version, ...), plus one human-readable
``parameters`` entry in the layout other image-generation tools write (prompt on the first
line, then ``Negative prompt:`` and ``Key: value`` pairs), which image viewers and galleries show.
"""
from __future__ import annotations

import json
from pathlib import Path

PREFIX = "musefast:"


def save_image(image, path: Path, params: dict) -> None:
    """Save a PIL image; a PNG carries ``params`` (JSON-able values) in its text chunks."""
    if path.suffix.lower() != ".png":
        image.save(path)
        return
    image.save(path, pnginfo=png_info(params))


def png_info(params: dict):
    """The PNG text chunks of ``params`` (for ``image.save(..., format="PNG", pnginfo=...)``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in params.items():
        info.add_text(PREFIX + key, json.dumps(value))  # None too: "no negative prompt" is a setting
    info.add_text("parameters", _readable(params))
    return info


def generation_params(request, image, *, sampler: str) -> dict:
    """What a text-to-image PNG carries, from ``musefast generate`` and ``musefast serve`` alike
    (so both write the same bytes for the same image): ``request`` — a resolved
    :class:`musefast.generation.Request`, every setting that determines the image — under
    ``"request"``, and the names ``--from-png`` and image viewers read."""
    from musefast import __version__

    meta = request.to_metadata()
    return {"command": "generate", "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "seed": request.seed, "steps": request.num_steps, "guidance_scale": request.guidance_scale,
            "sampler": sampler, "model": request.model, "cache": meta["cache"], "request": meta,
            "size": f"{image.width}x{image.height}", "version": __version__}


def read_params(path: str | Path) -> dict:
    """The parameters :func:`save_image` wrote into a PNG ({} if it has none)."""
    from PIL import Image

    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}) or {})
    return {k[len(PREFIX):]: json.loads(v) for k, v in text.items() if k.startswith(PREFIX)}


def _readable(params: dict) -> str:
    lines = [params.get("prompt") or ""]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    names = {"steps": "Steps", "sampler": "Sampler", "guidance_scale": "CFG scale", "seed": "Seed",
             "size": "Size", "model": "Model", "version": "Version"}
    lines.append(", ".join(f"{label}: {params[key]}" for key, label in names.items() if params.get(key) is not None))
    return "\n".join(lines)
