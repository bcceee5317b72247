"""The fields of an images request, checked: OpenAI's names and values, and musefast's own
(``seed``, ``negative_prompt``, ``num_inference_steps``, ``guidance_scale``, ``cache``,
``strength``) as extra body keys.

Every mistake is an :class:`~musefast.serve.errors.APIError` 400 naming the field and what
it accepts. Multipart bodies (edits) send every value as text: numbers and booleans are read
from it. No field ever names a file or path on the server: images arrive as uploads only.
"""
from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass

from musefast.cli_checks import MAX_SEED
from musefast.generation import Request
from musefast.serve.config import Limits
from musefast.serve.errors import APIError, invalid
from musefast.serve.images import FORMATS

COMMON = ("prompt", "model", "n", "size", "response_format", "output_format", "output_compression", "user",
          "stream", "partial_images", "quality", "background", "moderation", "style",
          "seed", "negative_prompt", "num_inference_steps", "guidance_scale", "cache")
EDIT_ONLY = ("image", "mask", "strength", "input_fidelity")
QUALITIES = ("auto", "low", "medium", "high", "standard", "hd")  # accepted and ignored: the steps decide
MAX_STEPS = 1000
# Request's own field names in its messages -> the request field a client sent
_RENAMED = {"num_steps": "num_inference_steps"}


@dataclass(frozen=True)
class Output:
    """How a request wants its images back."""

    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    stream: bool = False
    partial_images: int = 0
    user: str | None = None


def parse(body: dict, *, model_id: str, limits: Limits, edit: bool = False, init_image=None,
          mask=None) -> tuple[list[Request], Output]:
    """``body`` (a JSON object, or a multipart form's text fields) -> one Request per image and
    the output options. Image ``i`` of ``n`` has seed ``seed + i``, so it equals a one-image
    ``musefast generate --seed SEED+i`` run; without a seed one is drawn."""
    if not isinstance(body, dict):
        raise invalid(None, "the request body must be a JSON object")
    allowed = COMMON + (EDIT_ONLY if edit else ())
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise invalid(unknown[0], f"unknown field {unknown[0]!r}; this endpoint accepts {', '.join(allowed)}",
                      "unknown_parameter")
    model = body.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"model {model!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid("prompt", "prompt must be a non-empty string", "missing_required_parameter"
                      if prompt is None else "invalid_value")
    if len(prompt) > limits.max_prompt_chars:
        raise invalid("prompt", f"prompt has {len(prompt)} characters; this server allows at most "
                                f"{limits.max_prompt_chars}", "string_above_max_length")
    n = _int(body, "n", 1, 1, limits.max_n)
    size = _size(body.get("size"))
    output = Output(
        response_format=_choice(body, "response_format", "b64_json", ("b64_json", "url")),
        output_format=_choice(body, "output_format", "png", tuple(FORMATS)),
        output_compression=_int(body, "output_compression", None, 0, 100),
        stream=_bool(body, "stream"),
        partial_images=_int(body, "partial_images", 0, 0, 3),
        user=_optional_str(body, "user"))
    if output.stream and output.response_format == "url":
        raise invalid("response_format", "stream returns images as b64_json events; drop response_format=url")
    _choice(body, "quality", "auto", QUALITIES)
    if _choice(body, "background", "auto", ("auto", "opaque", "transparent")) == "transparent":
        raise invalid("background", "background 'transparent' is not supported: this model makes opaque images "
                                    "(use 'auto' or 'opaque')")
    _choice(body, "moderation", "auto", ("auto", "low"))
    _choice(body, "style", "vivid", ("vivid", "natural"))
    _choice(body, "input_fidelity", "low", ("low", "high"))
    seed = _int(body, "seed", None, 0, MAX_SEED - n + 1)
    if seed is None:
        seed = secrets.randbelow(2**31)
    settings = dict(
        negative_prompt=_optional_str(body, "negative_prompt"),
        num_steps=_int(body, "num_inference_steps", None, 1, MAX_STEPS),
        guidance_scale=_number(body, "guidance_scale"),
        cache=_choice(body, "cache", None, ("fast",)),
        strength=_number(body, "strength") if edit else None,
    )
    if edit:
        if size is not None:
            raise invalid("size", "an edit's size is its image's size: leave size out (or 'auto')")
        if init_image is None:
            raise invalid("image", "image is required: upload the image to edit", "missing_required_parameter")
    requests = []
    for i in range(n):
        try:
            requests.append(Request(prompt=prompt, seed=seed + i, size=size, model=model_id, init_image=init_image,
                                    mask=mask, **settings))
        except (ValueError, TypeError) as exc:
            raise request_error(exc) from None
    return requests, output


def request_error(exc: BaseException) -> APIError:
    """A ValueError/TypeError of ``Request`` or of the model's checks as a 400 naming the
    client's field (``num_steps`` is ``num_inference_steps`` on the wire)."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = re.match(r"[a-z_]+", message)
    param = first.group(0) if first else None
    if param in _RENAMED:
        message = _RENAMED[param] + message[len(param):]
        param = _RENAMED[param]
    if param == "init_image":
        param = "image"
    known = set(COMMON + EDIT_ONLY)
    return invalid(param if param in known else None, message)


def _size(value) -> tuple[int, int] | None:
    if value is None or value == "auto":
        return None
    match = re.fullmatch(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", value) if isinstance(value, str) else None
    if match is None:
        raise invalid("size", f"size must be 'auto' or 'WIDTHxHEIGHT' in pixels such as '256x256', got {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    return height, width


def _present(body: dict, name: str):
    value = body.get(name)
    return None if value is None or value == "" else value


def _int(body: dict, name: str, default, low: int, high: int):
    value = _present(body, name)
    if value is None:
        return default
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):  # a multipart field
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(name, f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _number(body: dict, name: str):
    value = _present(body, name)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"{name} must be a finite number, got {value!r}")
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = _present(body, name)
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false, got {value!r}")
    return value


def _choice(body: dict, name: str, default, allowed: tuple):
    value = _present(body, name)
    if value is None:
        return default
    if value not in allowed:
        raise invalid(name, f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _optional_str(body: dict, name: str):
    value = _present(body, name)
    if value is not None and not isinstance(value, str):
        raise invalid(name, f"{name} must be a string, got {type(value).__name__}")
    return value
