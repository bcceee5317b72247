"""diffusers' aMUSEd component objects -> musefast's, converted once when a pipeline is built.

A diffusers user swaps ``from diffusers import AmusedPipeline`` for ``from musefast import
AmusedPipeline`` and keeps building it from the same objects: a ``VQModel``, a
``CLIPTokenizer`` + ``CLIPTextModelWithProjection``, a ``UVit2DModel`` and an
``AmusedScheduler``. Their weights are copied into musefast's models through the same strict
key mapping as the files (:mod:`musefast.compat.amused_weights`); the text model is used as it
is (musefast's :class:`CLIPTextEncoder` wraps a transformers model). diffusers is never
imported: the objects are recognised by their class names and configs.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from musefast.compat.amused_weights import fill_converted
from musefast.models.serialization import config_from_dict
from musefast.models.text import CLIPTextEncoder, TextEncoder
from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.models.uvit import diffusers_source_keys as uvit_keys
from musefast.models.vqgan import VQGAN
from musefast.models.vqmodel import diffusers_source_keys as vq_keys
from musefast.models.vqmodel import vqgan_config_from_diffusers

SCHEDULER_CLASS = "AmusedScheduler"


@dataclass
class AmusedSchedulerConfig:
    """What musefast reads of diffusers' ``AmusedScheduler``: its [MASK] id and masking schedule.
    ``pipe.components["scheduler"]``; saved as ``scheduler/scheduler_config.json``."""

    mask_token_id: int
    masking_schedule: str = "cosine"

    @property
    def config(self) -> dict:
        return {"_class_name": SCHEDULER_CLASS, "mask_token_id": self.mask_token_id,
                "masking_schedule": self.masking_schedule}

    def save_pretrained(self, folder) -> None:
        import json
        from pathlib import Path

        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "scheduler_config.json").write_text(json.dumps(self.config, indent=2) + "\n")


def is_peer_module(obj, class_name: str) -> bool:
    return type(obj).__name__ == class_name and hasattr(obj, "config") and hasattr(obj, "state_dict")


def _config_dict(module) -> dict:
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def _state(module) -> dict[str, torch.Tensor]:
    # copies: musefast's CPU engine may repack or fold weights, and the peer's model stays intact
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def convert_transformer(transformer) -> UVit2D:
    """diffusers ``UVit2DModel`` -> :class:`UVit2D` in the same dtype, on the same device."""
    config = config_from_dict(UVit2DConfig, _config_dict(transformer), source="transformer.config (UVit2DModel)")
    weight = next(transformer.parameters())
    return fill_converted(lambda: UVit2D(config), _state(transformer), uvit_keys,
                          source="the UVit2DModel passed as transformer=", device=weight.device, dtype=weight.dtype)


def convert_vqvae(vqvae) -> VQGAN:
    """diffusers ``VQModel`` -> :class:`VQGAN` (float32: aMUSEd's VQ decodes in float32)."""
    config = vqgan_config_from_diffusers(_config_dict(vqvae), source="vqvae.config (VQModel)")
    return fill_converted(lambda: VQGAN(config), _state(vqvae), vq_keys, source="the VQModel passed as vqvae=",
                          device=next(vqvae.parameters()).device, dtype=torch.float32)


def convert_text_encoder(text_encoder, tokenizer) -> CLIPTextEncoder | None:
    """A transformers CLIP text model + tokenizer -> :class:`CLIPTextEncoder` (the same model
    object, not a copy); None when either is None (a pipeline fed embeddings)."""
    if isinstance(text_encoder, TextEncoder):
        if tokenizer is not None:
            raise ValueError("text_encoder is already a musefast text encoder (with its tokenizer): "
                             "do not also pass tokenizer=")
        return text_encoder
    if text_encoder is None or tokenizer is None:
        return None
    if type(text_encoder).__name__ != "CLIPTextModelWithProjection":
        raise TypeError(f"text_encoder must be a transformers CLIPTextModelWithProjection or a musefast "
                        f"CLIPTextEncoder, got {type(text_encoder).__name__}")
    return CLIPTextEncoder(text_encoder.eval(), tokenizer)


def scheduler_settings(scheduler) -> AmusedSchedulerConfig | None:
    """diffusers ``AmusedScheduler`` (or musefast's :class:`AmusedSchedulerConfig`) -> settings."""
    if scheduler is None or isinstance(scheduler, AmusedSchedulerConfig):
        return scheduler
    if type(scheduler).__name__ != SCHEDULER_CLASS:
        raise TypeError(f"scheduler must be diffusers' AmusedScheduler, got {type(scheduler).__name__}")
    return AmusedSchedulerConfig(int(scheduler.config.mask_token_id),
                                 scheduler.config.get("masking_schedule", "cosine"))


class PeerModules:
    """Weak references to the peer's objects a pipeline was built from: ``pipe.to()`` moves and
    casts them too while their owner keeps them (a diffusers pipeline's ``to()`` moves the
    objects it was given), without the pipeline keeping a second copy of the weights alive."""

    def __init__(self, modules):
        self._refs = [weakref.ref(m) for m in modules if m is not None and hasattr(m, "to")]

    def to(self, device=None, dtype=None) -> None:
        for ref in self._refs:
            module = ref()
            if module is not None:
                module.to(device=device, dtype=dtype)
