"""MaskGIT / Muse decoding: schedules, peer presets and the sampler."""
from musefast.sampling.cache import GuidedForward, StepCache
from musefast.sampling.presets import PRESETS, Preset, get_preset
from musefast.sampling.sampler import MaskGitSampler
from musefast.sampling.schedules import (
    check_guidance_scale,
    choice_temperature_at,
    guidance_scale_at,
    mask_count,
    mask_ratio,
    temperature_at,
    uses_guidance,
)

__all__ = [
    "MaskGitSampler",
    "StepCache",
    "GuidedForward",
    "Preset",
    "PRESETS",
    "get_preset",
    "mask_ratio",
    "mask_count",
    "guidance_scale_at",
    "choice_temperature_at",
    "temperature_at",
    "check_guidance_scale",
    "uses_guidance",
]
