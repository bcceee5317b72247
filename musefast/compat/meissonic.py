"""Reading the peer's (viiika/Meissonic) ``transformer/`` folders into :class:`MeissonicTransformer`.

The peer saves with diffusers' ``save_pretrained``: ``config.json`` whose ``_class_name`` is
``Transformer2DModel`` — a name diffusers uses for a different class — so a Meissonic transformer
is recognised by its config *keys* (:func:`is_meissonic_transformer`), never by that name.
Weights are ``diffusion_pytorch_model[.<variant>].safetensors``; conversion is strict (every
missing, unused or mis-shaped key is listed, naming the file). Key mapping:

================================================  ==========================================
peer Transformer2DModel                           musefast MeissonicTransformer
================================================  ==========================================
transformer_blocks.i.attn.to_{q,k,v}              transformer_blocks.i.attn.to_qkv (rows q;k;v)
transformer_blocks.i.attn.add_{q,k,v}_proj        transformer_blocks.i.attn.add_qkv
transformer_blocks.i.attn.to_out.0                transformer_blocks.i.attn.to_out
transformer_blocks.i.ff[_context].net.0.proj      transformer_blocks.i.ff[_context].proj_in
transformer_blocks.i.ff[_context].net.2           transformer_blocks.i.ff[_context].proj_out
single_transformer_blocks.i.attn.to_{q,k,v}       single_transformer_blocks.i.to_qkv_mlp
  + single_transformer_blocks.i.proj_mlp            (rows q;k;v;mlp)
single_transformer_blocks.i.attn.norm_{q,k}       single_transformer_blocks.i.norm_{q,k}
down_block.downsample.*, up_block.upsample.*      downsample.*, upsample.*
embed.conv, mlm_layer.conv{1,2} (1x1 convs)       the same names, 2-D Linear weights
================================================  ==========================================
Every other key keeps its name.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from musefast.compat.amused_weights import CONFIG_NAME, load_converted
from musefast.models.serialization import config_from_dict

# keys that only the peer's transformer config has together (diffusers' own Transformer2DModel
# and FluxTransformer2DModel lack codebook_size / vocab_size / downsample)
CONFIG_KEYS = frozenset({"num_single_layers", "axes_dims_rope", "joint_attention_dim", "pooled_projection_dim",
                         "codebook_size", "vocab_size", "downsample", "upsample"})


def read_transformer_config(folder: str | os.PathLike) -> dict | None:
    """The folder's config.json as a dict when it is a Meissonic transformer config, else None."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and CONFIG_KEYS <= data.keys() and "_class" not in data else None


def is_meissonic_transformer(folder: str | os.PathLike) -> bool:
    """True when ``folder/config.json`` is a peer Meissonic/Monetico transformer config."""
    return read_transformer_config(folder) is not None


def is_meissonic_pipeline(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a Meissonic/Monetico pipeline folder (its ``transformer/`` is one)."""
    return (Path(folder) / "model_index.json").is_file() and is_meissonic_transformer(Path(folder) / "transformer")


def source_keys(key: str) -> list[str]:
    """The peer key(s) a :class:`MeissonicTransformer` parameter is made of (several are
    concatenated along dim 0)."""
    prefix, _, leaf = key.rpartition(".")
    module, _, last = prefix.rpartition(".")
    if last == "to_qkv":
        return [f"{module}.to_{p}.{leaf}" for p in "qkv"]
    if last == "add_qkv":
        return [f"{module}.add_{p}_proj.{leaf}" for p in "qkv"]
    if last == "to_qkv_mlp":
        return [f"{module}.attn.to_{p}.{leaf}" for p in "qkv"] + [f"{module}.proj_mlp.{leaf}"]
    if last == "to_out" and module.endswith(".attn"):
        return [f"{prefix}.0.{leaf}"]
    if last in ("norm_q", "norm_k") and module.startswith("single_transformer_blocks."):
        return [f"{module}.attn.{last}.{leaf}"]
    if last == "proj_in" and module.rpartition(".")[2] in ("ff", "ff_context"):
        return [f"{module}.net.0.proj.{leaf}"]
    if last == "proj_out" and module.rpartition(".")[2] in ("ff", "ff_context"):
        return [f"{module}.net.2.{leaf}"]
    if key.startswith("downsample."):
        return ["down_block." + key]
    if key.startswith("upsample."):
        return ["up_block." + key]
    return [key]


def load_transformer(cls, folder: str | os.PathLike, *, variant: str | None = None, device=None,
                     dtype: torch.dtype | None = None, backend: str | None = None):
    """Build ``cls`` (:class:`MeissonicTransformer`, whose ``config_class`` reads the config) from a
    peer transformer folder, strictly. The class is passed in: this reader never imports a model."""
    data = read_transformer_config(folder)
    if data is None:
        raise ValueError(f"{Path(folder) / CONFIG_NAME} is not a Meissonic transformer config "
                         f"(needs the keys {sorted(CONFIG_KEYS)})")
    config = config_from_dict(cls.config_class, data, source=str(Path(folder) / CONFIG_NAME))
    config = replace(config, backend=backend)
    return load_converted(lambda: cls(config), folder, source_keys, variant=variant, device=device, dtype=dtype)


__all__ = ["CONFIG_KEYS", "is_meissonic_pipeline", "is_meissonic_transformer", "load_transformer",
           "read_transformer_config", "source_keys"]
