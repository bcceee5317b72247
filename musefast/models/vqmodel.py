"""aMUSEd's VQ tokenizer: a diffusers ``VQModel`` folder (``vqvae/``) as a musefast :class:`VQGAN`.

aMUSEd's VQ is a conv-only VQGAN — five levels of widths (128, 256, 256, 512, 768), two
residual blocks per level, no attention in the mid block, f = 16, an 8192 × 64 codebook looked
up directly by token (``lookup_from_codebook``) — working on pixels in [0, 1]. That is exactly
the topology of :class:`musefast.models.VQGAN` (musefast's VectorQuantizer and convolutions),
so loading is a config translation plus a key rename:

===========================================  =======================================
diffusers VQModel                            musefast VQGAN
===========================================  =======================================
encoder.down_blocks.i.resnets.j.*            encoder.levels.i.blocks.j.*
encoder.down_blocks.i.downsamplers.0.conv    encoder.levels.i.resample.conv
decoder.up_blocks.i.resnets.j.*              decoder.levels.i.blocks.j.*
decoder.up_blocks.i.upsamplers.0.conv        decoder.levels.i.resample.conv
{en,de}coder.mid_block.resnets.j.*           {en,de}coder.mid.j.*
*.conv_shortcut                              *.shortcut
{en,de}coder.conv_norm_out                   {en,de}coder.norm_out
quant_conv, quantize, post_quant_conv        (same)
===========================================  =======================================

Decoding always runs in float32 (``force_upcast``): a half-precision aMUSEd VQ decoder gives
NaNs. Configurations musefast does not implement (mid-block attention, spatial norm, other
block types or activations) are refused with the field that asks for them.
"""
from __future__ import annotations

import math
import os
import re
from functools import reduce
from pathlib import Path

import torch

from musefast.compat.amused_weights import load_converted, read_diffusers_config
from musefast.models.vqgan import VQGAN, VQGANConfig

DIFFUSERS_CLASS = "VQModel"

# diffusers fields that change nothing musefast computes (training, latent-diffusion scaling)
_IGNORED_FIELDS = {"sample_size", "scaling_factor", "force_upcast", "shift_factor", "latents_mean", "latents_std"}
# fields whose value must be the one musefast implements, and that value
_REQUIRED = {"act_fn": "silu", "norm_type": "group", "mid_block_add_attention": False}


def vqgan_config_from_diffusers(data: dict, *, source: str = "config.json") -> VQGANConfig:
    """Translate a diffusers ``VQModel`` config (dict of its config.json) to a VQGANConfig."""
    known = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "latent_channels", "num_vq_embeddings", "norm_num_groups", "vq_embed_dim",
             "lookup_from_codebook"} | _IGNORED_FIELDS | set(_REQUIRED)
    unknown = sorted(k for k in data if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{source}: unknown VQModel field(s) {unknown}; musefast cannot tell what they change")
    defaults = {"act_fn": "silu", "norm_type": "group", "mid_block_add_attention": True}  # diffusers' defaults
    for field, wanted in _REQUIRED.items():
        value = data.get(field, defaults[field])
        if value != wanted:
            raise ValueError(f"{source}: {field}={value!r} is not supported (musefast's VQGAN implements "
                             f"{field}={wanted!r}, as aMUSEd's VQ)")
    widths = [int(w) for w in data.get("block_out_channels", (64,))]
    for field, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(data.get(field, (block,)))
        if len(types) != len(widths) or any(t != block for t in types):
            raise ValueError(f"{source}: {field}={types} is not supported: musefast needs {len(widths)} x {block!r}")
    in_channels = int(data.get("in_channels", 3))
    if int(data.get("out_channels", 3)) != in_channels:
        raise ValueError(f"{source}: out_channels={data.get('out_channels')} must equal in_channels={in_channels}")
    base = reduce(math.gcd, widths)
    latent = int(data.get("latent_channels", 3))
    embed = data.get("vq_embed_dim")
    return VQGANConfig(
        in_channels=in_channels, channels=base, channel_mult=tuple(w // base for w in widths),
        num_res_blocks=int(data.get("layers_per_block", 1)), num_mid_blocks=2, z_channels=latent,
        embed_dim=latent if embed is None else int(embed), codebook_size=int(data.get("num_vq_embeddings", 256)),
        norm_groups=int(data.get("norm_num_groups", 32)), downsample="conv", signed_pixels=False,
        force_upcast=True,
    )


_RENAMES = [  # musefast key pattern -> diffusers key (first match wins)
    (r"^encoder\.levels\.(\d+)\.blocks\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.levels\.(\d+)\.resample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.levels\.(\d+)\.blocks\.(\d+)\.", r"decoder.up_blocks.\1.resnets.\2."),
    (r"^decoder\.levels\.(\d+)\.resample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"^(encoder|decoder)\.mid\.(\d+)\.", r"\1.mid_block.resnets.\2."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
]


def diffusers_source_keys(key: str) -> list[str]:
    """The diffusers ``VQModel`` key of a :class:`VQGAN` parameter."""
    for pattern, repl in _RENAMES:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return [key.replace(".shortcut.", ".conv_shortcut.")]


def load_vqmodel(folder: str | os.PathLike, *, variant: str | None = None,
                 device: str | torch.device | None = None, vq_backend: str | None = None) -> VQGAN:
    """Load a diffusers ``VQModel`` folder (config.json + diffusion_pytorch_model[.variant]
    .safetensors, e.g. ``amused-256/vqvae``) as a float32 :class:`VQGAN` (strict conversion:
    any missing, unused or mis-shaped key is an error naming the file)."""
    data = read_diffusers_config(folder, DIFFUSERS_CLASS)
    config = vqgan_config_from_diffusers(data, source=str(Path(folder) / "config.json"))
    return load_converted(lambda: VQGAN(config, vq_backend=vq_backend), folder, diffusers_source_keys,
                          variant=variant, device=device, dtype=torch.float32)


__all__ = ["load_vqmodel", "vqgan_config_from_diffusers", "diffusers_source_keys"]
