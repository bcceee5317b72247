"""Pipelines: text → image, inpaint, outpaint, mask-free edit; loading and generation."""
from musefast.pipelines.auto import generate, load
from musefast.pipelines.muse import MusePipeline, MuseSettings
from musefast.pipelines.random_init import random_pipeline

__all__ = ["MusePipeline", "MuseSettings", "generate", "load", "random_pipeline"]
