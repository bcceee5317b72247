"""Meissonic / Monetico on the engine: aMUSEd's logic, a transformer that takes the timestep."""
from __future__ import annotations

import torch

from musefast.generation.adapters.base import Stage
from musefast.generation.adapters.uvit import UVitAdapter
from musefast.generation.request import Request
from musefast.pipelines.meissonic import DEFAULTS


class MeissonicAdapter(UVitAdapter):
    family = "meissonic"
    text_to_image = DEFAULTS["text2image"]
    edit = DEFAULTS["image"]

    def start(self, request: Request, backend: str | None = None) -> Stage:
        stage = super().start(request, backend)
        stage.forward.model = _TimedModel(self.pipe.transformer, stage)  # the step cache calls it
        return stage

    def run(self, kind, tokens, context, steps, num_steps):
        values = [T - 1 - s for s, T in zip(steps, num_steps)]  # the scheduler's timesteps run T-1 ... 0
        # rows at one timestep take it as MeissonicPipeline passes it, a (1,) tensor
        t = torch.tensor(values[:1] if len(set(values)) == 1 else values, device=self.pipe.device)
        return self.pipe.transformer(tokens, context=context, timestep=t).permute(0, 2, 3, 1)


class _TimedModel:
    """The transformer at the current step of ``stage`` (for the step cache's calls)."""

    def __init__(self, transformer, stage: Stage):
        self.transformer, self.stage = transformer, stage

    def __call__(self, tokens, *, context, **cache_kw):
        t = torch.tensor([self.stage.num_steps - 1 - self.stage.step], device=tokens.device)
        out = self.transformer(tokens, context=context, timestep=t, **cache_kw)
        return out if cache_kw.get("rows") is not None else out.permute(0, 2, 3, 1)
