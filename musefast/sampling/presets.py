"""Presets: each peer's decoding step as parameters of ``ops.cfg_sample_remask`` + schedules.

The step itself is defined in musefast/reference/remask.py. A preset fixes, per step, the mask count, the guidance scale, the sampling and
choice temperatures, the top-k filter and the confidence measure:

* ``maskgit`` (google-research/maskgit): categorical sampling at tau = 1, confidence
  log p + 4.5 (1 − r) Gumbel, cosine schedule, mask_len = floor(masked₀ γ(r)) clamped to
  [1, masked − 1]; no guidance (class-conditional); 8 steps (the paper's ImageNet 256 setting).
* ``amused`` (diffusers AmusedScheduler + AmusedPipeline): 12 steps, g = 10, tau = 1, choice
  temperature float32 linspace(2, 0, T), cosine schedule with diffusers' float32 mask counts.
* ``lucidrains`` (muse-maskgit-pytorch ``MaskGit.generate``): 18 steps, g = 3, top-k filter
  keeping ceil(0.1 K) logits, Gumbel sampling at tau · (steps left) / T, confidence p (its
  scores are 1 − p) with no noise, one mask count for the whole batch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from musefast.sampling import schedules


@dataclass(frozen=True)
class Preset:
    name: str
    num_steps: int
    mask_schedule: str = "cosine"
    mask_count_rule: str = "maskgit"
    guidance_scale: float = 1.0
    guidance_schedule: str = "constant"
    guidance_interval: tuple | None = None  # (a, b): guidance only on steps in that fraction of the decoding
    temperature: float = 1.0
    temperature_schedule: str = "constant"
    choice_temperature: float | tuple = 0.0
    choice_schedule: str = "constant"
    topk_filter_thres: float | None = None  # lucidrains' top_k(logits, thres): keep ceil((1 - thres) K)
    confidence: str = "logprob"

    def replace(self, **changes) -> "Preset":
        """A copy with some fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def top_k(self, num_classes: int) -> int | None:
        if self.topk_filter_thres is None:
            return None
        return max(1, math.ceil((1 - self.topk_filter_thres) * num_classes))

    def step_params(
        self,
        step: int,
        *,
        num_classes: int,
        masked_now: torch.Tensor,
        masked_start: torch.Tensor,
        seq_len: int,
        starting_mask_ratio=1.0,
    ) -> dict:
        """Keyword arguments of ``ops.cfg_sample_remask`` for step ``step`` (all but the tensors,
        seed and step)."""
        T = self.num_steps
        return {
            "num_to_mask": schedules.mask_count(
                self.mask_count_rule, step, T, masked_now=masked_now, masked_start=masked_start,
                seq_len=seq_len, schedule=self.mask_schedule, starting_mask_ratio=starting_mask_ratio,
            ),
            "guidance_scale": schedules.guidance_scale_at(self.guidance_schedule, self.guidance_scale, step, T,
                                                          self.guidance_interval),
            "temperature": schedules.temperature_at(self.temperature_schedule, self.temperature, step, T),
            "choice_temperature": schedules.choice_temperature_at(
                self.choice_schedule, self.choice_temperature, step, T
            ),
            "top_k": self.top_k(num_classes),
            "confidence": self.confidence,
        }


PRESETS = {
    "maskgit": Preset(
        "maskgit", num_steps=8, mask_count_rule="maskgit", choice_temperature=4.5, choice_schedule="maskgit",
    ),
    "amused": Preset(
        "amused", num_steps=12, mask_count_rule="amused", guidance_scale=10.0,
        choice_temperature=(2.0, 0.0), choice_schedule="linear",
    ),
    "lucidrains": Preset(
        "lucidrains", num_steps=18, mask_count_rule="lucidrains", guidance_scale=3.0,
        temperature_schedule="lucidrains", topk_filter_thres=0.9, confidence="prob",
    ),
}


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a Preset, got {preset!r}")
    return PRESETS[preset]
