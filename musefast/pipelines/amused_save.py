"""Save an aMUSEd pipeline in diffusers' folder layout (what ``from_pretrained`` of either library reads).

``model_index.json``, ``transformer/`` (a ``UVit2DModel``), ``vqvae/`` (a ``VQModel``),
``text_encoder/`` + ``tokenizer/`` (transformers' own ``save_pretrained``), ``scheduler/``
(an ``AmusedScheduler`` config). The weights are written back under diffusers' keys: the
inverse of the strict key mapping musefast loads them with (fused q/k/v and k/v projections
split, 1×1 convolutions given back their two trailing dims).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from musefast.models.uvit import UVit2D
from musefast.models.uvit import diffusers_source_keys as uvit_keys
from musefast.models.vqgan import VQGAN
from musefast.models.vqmodel import diffusers_source_keys as vq_keys

DIFFUSERS_VERSION = "0.33.1"  # the last diffusers release that lists aMUSEd as supported
# UVit2DModel parameters stored as 1x1 convolutions that musefast holds as linear weights
UVIT_CONV_1X1 = ("embed.conv.weight", "mlm_layer.conv1.weight", "mlm_layer.conv2.weight")


def peer_state(module, source_keys, conv_1x1=(), split=None) -> dict[str, torch.Tensor]:
    """``module``'s weights under the peer's keys: the inverse of a strict loading map
    (``source_keys(name)`` -> the peer keys a parameter was concatenated from, along dim 0;
    ``split(name, tensor, keys)`` -> their row counts, when they are not equal)."""
    out = {}
    for name, tensor in module.state_dict().items():
        keys = source_keys(name)
        if len(keys) == 1:
            parts = [tensor]
        else:
            parts = tensor.split(split(name, tensor, keys)) if split is not None else tensor.chunk(len(keys))
        for key, part in zip(keys, parts):
            part = part.detach().contiguous().clone()
            out[key] = part[..., None, None] if key in conv_1x1 and part.dim() == 2 else part
    return out


def write_weights(folder: Path, state: dict, variant: str | None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    name = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    save_file(state, str(folder / name))


def write_config(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def uvit_config(transformer: UVit2D) -> dict:
    values = {k: v for k, v in dataclasses.asdict(transformer.config).items() if k != "backend"}
    return {"_class_name": "UVit2DModel", "_diffusers_version": DIFFUSERS_VERSION, **values}


def vqmodel_config(vqvae: VQGAN) -> dict:
    """A :class:`VQGAN` config as diffusers' ``VQModel``; ValueError when it has no equivalent."""
    c = vqvae.config
    if (c.downsample, c.signed_pixels, c.num_mid_blocks, c.norm, c.patch_size) != ("conv", False, 2, "group", 1):
        raise ValueError("this VQGAN has no diffusers VQModel equivalent (only aMUSEd-style VQs can be saved "
                         "in diffusers' layout)")
    widths = [c.channels * m for m in c.channel_mult]
    return {"_class_name": "VQModel", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
            "block_out_channels": widths, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "in_channels": c.in_channels,
            "out_channels": c.in_channels, "latent_channels": c.z_channels, "layers_per_block": c.num_res_blocks,
            "lookup_from_codebook": True, "mid_block_add_attention": False, "norm_num_groups": c.norm_groups,
            "norm_type": "group", "num_vq_embeddings": c.codebook_size, "vq_embed_dim": c.embed_dim,
            "force_upcast": True}


def save_text_encoder(encoder, folder: Path, index: dict, variant: str | None) -> None:
    """``text_encoder/`` and ``tokenizer/`` with transformers' own ``save_pretrained``, named in
    ``index`` (both None without a text encoder)."""
    if encoder is None:
        index["text_encoder"] = index["tokenizer"] = [None, None]
        return
    encoder.model.save_pretrained(folder / "text_encoder", variant=variant)
    encoder.tokenizer.save_pretrained(folder / "tokenizer")
    index["text_encoder"] = ["transformers", type(encoder.model).__name__]
    index["tokenizer"] = ["transformers", type(encoder.tokenizer).__name__]


def save_amused(pipe, folder, *, variant: str | None = None) -> None:
    """Write ``pipe`` (an :class:`~musefast.AmusedPipeline`) to ``folder`` in diffusers' layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": type(pipe).__name__, "_diffusers_version": DIFFUSERS_VERSION}
    if pipe.transformer is not None:
        write_config(folder / "transformer", uvit_config(pipe.transformer))
        write_weights(folder / "transformer", peer_state(pipe.transformer, uvit_keys, UVIT_CONV_1X1), variant)
        index["transformer"] = ["diffusers", "UVit2DModel"]
    if pipe.vqvae is not None:
        write_config(folder / "vqvae", vqmodel_config(pipe.vqvae))
        write_weights(folder / "vqvae", peer_state(pipe.vqvae, vq_keys), variant)
        index["vqvae"] = ["diffusers", "VQModel"]
    save_text_encoder(pipe.text_encoder, folder, index, variant)
    pipe.scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", "AmusedScheduler"]
    for name in ("transformer", "vqvae", "text_encoder", "tokenizer"):
        index.setdefault(name, [None, None])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
