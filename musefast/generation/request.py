"""``Request``: one image to generate, checked once, the same rules for every entry point.

A request names what determines its image — the prompt (or embeddings), the negative prompt,
the seed, the decoding settings, the size, the step cache and, for edits, the source image
with a mask or a strength. Settings left as None take the model family's defaults when an
adapter resolves the request (:meth:`musefast.generation.adapters.Adapter.resolve`); a
resolved request has every setting filled and its family named, so its metadata
(:meth:`Request.to_metadata`) regenerates the same image (:meth:`Request.from_metadata`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from musefast.cli_checks import MAX_SEED
from musefast.sampling.cache import CACHE_PRESETS, StepCache, resolve_cache
from musefast.sampling.schedules import GUIDANCE_SCHEDULES, check_guidance_interval, check_guidance_scale

# Keys of the metadata that describe a request: the fields that determine the image
# (the images and embeddings themselves are not metadata: see ``to_metadata``).
METADATA_FIELDS = ("family", "model", "prompt", "negative_prompt", "seed", "num_steps", "guidance_scale",
                   "guidance_schedule", "guidance_interval", "temperature", "choice_temperature", "size", "cache",
                   "strength", "edit", "sampler")
SAMPLER = "fused"  # the engine's decoding step (ops.cfg_sample_remask); compat samplers run outside it


@dataclass(frozen=True)
class Request:
    """One image.

    Args:
        prompt: the text (a non-empty string), or None with ``prompt_embeds``.
        negative_prompt: the text of the unconditional branch (None: the empty prompt).
        seed: Philox key of the decoding, an int in [0, 2**63 - 1].
        num_steps: decoding steps (None: the family's default).
        guidance_scale: classifier-free guidance, diffusers' convention (<= 1: none).
        guidance_schedule: one of ``GUIDANCE_SCHEDULES``; guidance_interval: (a, b) fractions
            of the decoding with guidance.
        temperature: sampling temperature tau >= 0 (0 = argmax); choice_temperature: the
            confidence noise, a number or a (start, end) pair (aMUSEd / Meissonic: (2, 0)).
        size: (height, width) in pixels (None: the model's size).
        cache: the step cache: None (exact), ``"fast"`` or a :class:`musefast.StepCache`.
        init_image: source image of an edit (PIL image or (3, H, W) tensor in [0, 1]);
            mask: what to repaint (white / nonzero; inpainting); strength: the share of the
            steps run on the noised image (image-to-image), in (0, 1].
        prompt_embeds, negative_prompt_embeds: precomputed text embeddings in the family's
            format, instead of the prompts.
        family, model: set by the adapter / the caller, for the metadata.
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int = 0
    num_steps: int | None = None
    guidance_scale: float | None = None
    guidance_schedule: str | None = None
    guidance_interval: tuple | None = None
    temperature: float | None = None
    choice_temperature: Any = None
    size: tuple | None = None
    cache: Any = None
    init_image: Any = None
    mask: Any = None
    strength: float | None = None
    prompt_embeds: Any = None
    negative_prompt_embeds: Any = None
    family: str | None = None
    model: str | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalise once
        if self.prompt_embeds is None:
            if not isinstance(self.prompt, str) or not self.prompt.strip():
                raise ValueError(f"prompt must be a non-empty string (or pass prompt_embeds), got {self.prompt!r}")
        elif self.prompt is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string or None, got {type(self.negative_prompt).__name__}")
        if self.negative_prompt is not None and self.negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        set_("seed", _int("seed", self.seed, 0, MAX_SEED))
        if self.num_steps is not None:
            set_("num_steps", _int("num_steps", self.num_steps, 1, 10_000))
        if self.guidance_scale is not None:
            set_("guidance_scale", check_guidance_scale(self.guidance_scale))
        if self.guidance_schedule is not None and self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {self.guidance_schedule!r}")
        if self.guidance_interval is not None:
            set_("guidance_interval", check_guidance_interval(self.guidance_interval))
        if self.temperature is not None:
            set_("temperature", _non_negative("temperature", self.temperature))
        if self.choice_temperature is not None:
            set_("choice_temperature", _choice_temperature(self.choice_temperature))
        if self.size is not None:
            set_("size", _size(self.size))
        if isinstance(self.cache, dict):  # from metadata
            set_("cache", StepCache(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.cache.items()}))
        resolve_cache(self.cache)  # None, a preset name or a StepCache: anything else is an error
        if self.mask is not None and self.init_image is None:
            raise ValueError("mask needs init_image (the image to repaint)")
        if self.strength is not None:
            if self.init_image is None:
                raise ValueError("strength applies to image-to-image: pass init_image")
            strength = _non_negative("strength", self.strength)
            if not 0.0 < strength <= 1.0:
                raise ValueError(f"strength must lie in (0, 1], got {self.strength!r}")
            set_("strength", strength)
        if self.init_image is not None and self.size is not None:
            raise ValueError("with init_image the size comes from the image: do not pass size")
        for name in ("family", "model"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {type(value).__name__}")

    @property
    def edit(self) -> str | None:
        """``"inpaint"``, ``"img2img"`` or None (text to image)."""
        if self.init_image is None:
            return None
        return "inpaint" if self.mask is not None else "img2img"

    def replace(self, **changes) -> "Request":
        return dataclasses.replace(self, **changes)

    def to_metadata(self) -> dict:
        """Every setting that determines the image, as JSON-able values (PNG metadata, batch
        manifest). A request from embeddings cannot be written (the text is not known); an edit
        records its kind and strength, and :meth:`from_metadata` needs its image and mask back."""
        if self.prompt_embeds is not None or self.negative_prompt_embeds is not None:
            raise ValueError("a request built from prompt embeddings has no prompt to write as metadata")
        out = {}
        for name in METADATA_FIELDS:
            value = getattr(self, name) if name != "sampler" else SAMPLER
            if name == "cache":
                value = _cache_metadata(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    @classmethod
    def from_metadata(cls, params: dict, *, init_image=None, mask=None) -> "Request":
        """The request :meth:`to_metadata` wrote (other keys, such as a file name or a version,
        are ignored). An edit's image (and mask) are passed here."""
        if not isinstance(params, dict):
            raise TypeError(f"metadata must be a dict, got {type(params).__name__}")
        if params.get("sampler", SAMPLER) != SAMPLER:
            raise ValueError(f"metadata names sampler {params['sampler']!r}; the engine runs {SAMPLER!r}")
        edit = params.get("edit")
        if edit is not None and init_image is None:
            raise ValueError(f"this metadata describes an {edit} edit: pass its init_image (and mask)")
        if (edit == "inpaint") != (mask is not None) and init_image is not None:
            raise ValueError(f"metadata edit {edit!r} does not match the arguments: inpainting takes a mask, "
                             "image-to-image none")
        known = {f.name for f in fields(cls)} & set(METADATA_FIELDS)
        kw = {k: params[k] for k in known if k in params}
        for name in ("size", "guidance_interval", "choice_temperature"):
            if isinstance(kw.get(name), list):
                kw[name] = tuple(kw[name])
        if isinstance(kw.get("cache"), str) and kw["cache"] not in CACHE_PRESETS:
            raise ValueError(f"metadata cache {kw['cache']!r} is not one of {sorted(CACHE_PRESETS)}")
        return cls(init_image=init_image, mask=mask, **kw)


def _cache_metadata(cache):
    if cache is None or isinstance(cache, str):
        return cache
    for name, preset in CACHE_PRESETS.items():
        if cache == preset:
            return name
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cache).items()}


def _int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return int(value)


def _non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _choice_temperature(value):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"choice_temperature must be a number or a (start, end) pair, got {value!r}")
        return tuple(_non_negative("choice_temperature", v) for v in value)
    return _non_negative("choice_temperature", value)


def _size(value) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"size must be (height, width) in pixels or one int, got {value!r}")
    return tuple(_int("size", v, 1, 1 << 16) for v in value)
