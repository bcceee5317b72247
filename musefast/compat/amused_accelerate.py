"""``musefast.accelerate(pipe)``: musefast kernels inside an existing diffusers aMUSEd pipeline.

For users who keep their diffusers code: every attention of ``pipe.transformer`` gets a
:class:`~musefast.compat.diffusers.MusefastAttnProcessor` (``musefast.ops.attention``), and
``pipe.scheduler.step`` becomes :func:`~musefast.compat.amused_scheduler.fused_step` (one fused
``cfg_sample_remask``: sampling, confidence and re-masking). Both swaps are in place, on the
pipeline's own objects — a scheduler shared by several pipelines is accelerated for all of
them — and the pipeline is returned. diffusers is imported here only by
``transformer.set_default_attn_processor()``, which restores diffusers' default processor.

The attention swap changes results only by floating-point rounding. The fused step samples
from the same distribution with the same mask counts and choice temperatures, but draws its
randomness differently (a Philox seed taken from the generator): pass ``fused_step=False`` to
keep diffusers' exact draws.
"""
from __future__ import annotations

from musefast.compat.amused_scheduler import fused_step as _fused_step
from musefast.compat.diffusers import MusefastAttnProcessor


class FusedAmusedStep:
    """Replacement of an ``AmusedScheduler`` instance's ``step`` (same signature)."""

    def __init__(self, scheduler, backend: str | None = None):
        self.scheduler = scheduler
        self.backend = backend

    def __call__(self, model_output, timestep, sample, starting_mask_ratio=1.0, generator=None, return_dict=True):
        return _fused_step(self.scheduler, model_output, timestep, sample, starting_mask_ratio, generator,
                           return_dict, backend=self.backend)


class _DefaultAttention:
    """``transformer.set_default_attn_processor()`` of an accelerated diffusers transformer:
    diffusers' ``AttnProcessor`` everywhere (undoing the attention swap)."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor  # only a diffusers object calls this

        self.transformer.set_attn_processor(AttnProcessor())


def accelerate(pipe, *, attention: bool = True, fused_step: bool = True, attention_backend: str | None = None,
               step_backend: str | None = None):
    """Swap musefast attention and the fused decoding step into a diffusers ``AmusedPipeline``
    (or ``AmusedImg2ImgPipeline`` / ``AmusedInpaintPipeline``), in place.

    Args:
        pipe: the diffusers pipeline (needs ``transformer`` and ``scheduler``).
        attention: set :class:`MusefastAttnProcessor` on every attention of the transformer.
        fused_step: replace ``pipe.scheduler.step`` with the fused step.
        attention_backend, step_backend: musefast backends (None = the best available).

    Returns:
        ``pipe`` itself. Calling it again only updates the backends.
    """
    if attention:
        transformer = getattr(pipe, "transformer", None)
        if not hasattr(transformer, "set_attn_processor"):
            raise TypeError(f"accelerate() needs a diffusers aMUSEd pipeline with a transformer, "
                            f"got {type(pipe).__name__}")
        transformer.set_attn_processor(MusefastAttnProcessor(attention_backend))
        # diffusers' own set_default_attn_processor refuses processors it does not list; on an
        # accelerated transformer it restores diffusers' default processor, as on a plain one
        transformer.set_default_attn_processor = _DefaultAttention(transformer)
    if fused_step:
        scheduler = getattr(pipe, "scheduler", None)
        if type(scheduler).__name__ != "AmusedScheduler":
            raise TypeError(f"the fused step replaces an AmusedScheduler's step, got {type(scheduler).__name__}")
        current = scheduler.__dict__.get("step")
        if isinstance(current, FusedAmusedStep):
            current.backend = step_backend
        else:
            scheduler.step = FusedAmusedStep(scheduler, step_backend)
    return pipe
