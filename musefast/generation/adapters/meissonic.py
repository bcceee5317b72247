"""Meissonic / Monetico on the engine: aMUSEd's logic, a transformer that takes the timestep
(the pipeline's stage carries the step cache's timed transformer)."""
from __future__ import annotations

import torch

from musefast.generation.adapters.uvit import UVitAdapter


class MeissonicAdapter(UVitAdapter):
    family = "meissonic"

    def run(self, kind, tokens, context, steps, num_steps):
        values = [T - 1 - s for s, T in zip(steps, num_steps)]  # the scheduler's timesteps run T-1 ... 0
        # rows at one timestep take it as MeissonicPipeline passes it, a (1,) tensor
        t = torch.tensor(values[:1] if len(set(values)) == 1 else values, device=self.pipe.device)
        return self.pipe.transformer(tokens, context=context, timestep=t).permute(0, 2, 3, 1)
