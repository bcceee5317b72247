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
from collections.abc import Mapping
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
from musefast.pipelines.loading import runnable

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
    return runnable(fill_converted(lambda: UVit2D(config), _state(transformer), uvit_keys,
                                   source="the UVit2DModel passed as transformer=", device=weight.device,
                                   dtype=weight.dtype))


def convert_vqvae(vqvae) -> VQGAN:
    """diffusers ``VQModel`` -> :class:`VQGAN` (float32: aMUSEd's VQ decodes in float32)."""
    config = vqgan_config_from_diffusers(_config_dict(vqvae), source="vqvae.config (VQModel)")
    return runnable(fill_converted(lambda: VQGAN(config), _state(vqvae), vq_keys, source="the VQModel passed as vqvae=",
                                   device=next(vqvae.parameters()).device, dtype=torch.float32))


def convert_text_encoder(text_encoder, tokenizer, max_length: int | None = None) -> CLIPTextEncoder | None:
    """A transformers CLIP text model + tokenizer -> :class:`CLIPTextEncoder` (the same model
    object, not a copy); None when either is None (a pipeline fed embeddings)."""
    if isinstance(text_encoder, TextEncoder):
        # pipe.components names the encoder's own tokenizer too: passing it back rebuilds the pipeline
        if tokenizer is not None and tokenizer is not getattr(text_encoder, "tokenizer", None):
            raise ValueError("text_encoder is already a musefast text encoder (with its tokenizer): "
                             "do not also pass another tokenizer=")
        return text_encoder
    if text_encoder is None or tokenizer is None:
        return None
    if type(text_encoder).__name__ != "CLIPTextModelWithProjection":
        raise TypeError(f"text_encoder must be a transformers CLIPTextModelWithProjection or a musefast "
                        f"CLIPTextEncoder, got {type(text_encoder).__name__}")
    return CLIPTextEncoder(text_encoder.eval(), tokenizer, max_length=max_length)


def scheduler_settings(scheduler) -> AmusedSchedulerConfig | None:
    """diffusers' ``AmusedScheduler``, Meissonic's ``Scheduler`` (the same config), or musefast's
    :class:`AmusedSchedulerConfig` -> settings."""
    if scheduler is None or isinstance(scheduler, AmusedSchedulerConfig):
        return scheduler
    config = getattr(scheduler, "config", None)
    if config is None or "mask_token_id" not in config:
        raise TypeError(f"scheduler must be diffusers' AmusedScheduler (or Meissonic's Scheduler), "
                        f"got {type(scheduler).__name__}")
    return AmusedSchedulerConfig(int(config["mask_token_id"]), config.get("masking_schedule", "cosine"))


@dataclass
class Converted:
    """Components after :func:`convert_components`: musefast's modules and what the pipeline keeps."""

    vqvae: VQGAN
    text_encoder: CLIPTextEncoder | None
    transformer: torch.nn.Module
    scheduler: AmusedSchedulerConfig | None
    peer_modules: "PeerModules"
    from_peer: bool


def convert_components(vqvae, text_encoder, transformer, tokenizer, scheduler, *, transformer_class: str,
                       is_peer_transformer, convert_peer_transformer, text_max_length: int | None = None) -> Converted:
    """Every component of an aMUSEd-family pipeline as musefast's, converting the peer's once.
    ``transformer_class`` names the peer's transformer in errors; ``is_peer_transformer(obj)``
    recognises it and ``convert_peer_transformer(obj)`` converts it."""
    if vqvae is None or transformer is None:
        raise ValueError("this pipeline needs vqvae= and transformer=")
    from_peer = (is_peer_module(vqvae, "VQModel") or is_peer_transformer(transformer) or tokenizer is not None
                 or scheduler is not None)
    peers = PeerModules([vqvae, transformer, text_encoder] if from_peer else [])
    if is_peer_module(vqvae, "VQModel"):
        vqvae = convert_vqvae(vqvae)
    if is_peer_transformer(transformer):
        transformer = convert_peer_transformer(transformer)
    elif not hasattr(transformer, "prepare_context"):
        raise TypeError(f"transformer must be musefast's model or the peer's {transformer_class}, "
                        f"got {type(transformer).__name__}")
    text_encoder = convert_text_encoder(text_encoder, tokenizer, text_max_length)
    return Converted(vqvae, text_encoder, transformer, scheduler_settings(scheduler), peers, from_peer)


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


def is_peer_meissonic_transformer(obj) -> bool:
    """The peer's Meissonic ``Transformer2DModel``: recognised by its config keys, as its folders
    are (:data:`musefast.compat.meissonic.CONFIG_KEYS`), never by that shared class name."""
    from musefast.compat.meissonic import CONFIG_KEYS

    config = getattr(obj, "config", None)
    # diffusers-style configs are mappings; musefast's own models carry a dataclass config
    return hasattr(obj, "state_dict") and isinstance(config, Mapping) and CONFIG_KEYS <= config.keys()


def convert_meissonic_transformer(transformer):
    """The peer's Meissonic transformer -> :class:`MeissonicTransformer`, same dtype and device."""
    from musefast.compat.meissonic import source_keys
    from musefast.models.meissonic import MeissonicConfig, MeissonicTransformer

    config = config_from_dict(MeissonicConfig, _config_dict(transformer), source="transformer.config (Meissonic)")
    weight = next(transformer.parameters())
    return runnable(fill_converted(lambda: MeissonicTransformer(config), _state(transformer), source_keys,
                                   source="the Meissonic transformer passed as transformer=", device=weight.device,
                                   dtype=weight.dtype))
