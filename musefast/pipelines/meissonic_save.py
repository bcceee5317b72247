"""Save a Meissonic / Monetico pipeline in the peer's folder layout (what the peer's
``Pipeline.from_pretrained`` and ``musefast.load`` read).

``model_index.json`` naming the peer's classes (``src.transformer.Transformer2DModel``,
``src.scheduler.Scheduler``), ``transformer/`` (its config keys and weights under the peer's
names: fused q/k/v(/mlp) rows split back, 1×1 convolutions given back their trailing dims),
``vqvae/`` (diffusers' ``VQModel``), ``text_encoder/`` + ``tokenizer/`` (transformers'),
``scheduler/`` (mask id and masking schedule).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from musefast.compat.meissonic import source_keys
from musefast.models.vqmodel import diffusers_source_keys as vq_keys
from musefast.pipelines.amused_save import (UVIT_CONV_1X1, peer_state, save_text_encoder, vqmodel_config,
                                            write_config, write_weights)

PEER_DIFFUSERS_VERSION = "0.32.2"  # what the peer's released folders name


def transformer_config(transformer) -> dict:
    values = {k: v for k, v in dataclasses.asdict(transformer.config).items() if k != "backend"}
    values["axes_dims_rope"] = list(values["axes_dims_rope"])
    return {"_class_name": "Transformer2DModel", "_diffusers_version": PEER_DIFFUSERS_VERSION, **values}


def _rows(transformer):
    """Row counts of the peer keys a fused parameter came from: q, k, v (the attention width
    each) and, for the single blocks' q/k/v/mlp, the MLP's rows after them."""
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim

    def split(name, tensor, keys):
        return [inner] * 3 + [tensor.shape[0] - 3 * inner] if len(keys) == 4 else [tensor.shape[0] // len(keys)] * len(keys)

    return split


def save_meissonic(pipe, folder, *, variant: str | None = None) -> None:
    """Write ``pipe`` (a :class:`~musefast.MeissonicPipeline`) to ``folder`` in the peer's layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "Pipeline", "_diffusers_version": PEER_DIFFUSERS_VERSION}
    transformer = pipe.transformer
    write_config(folder / "transformer", transformer_config(transformer))
    write_weights(folder / "transformer", peer_state(transformer, source_keys, UVIT_CONV_1X1, _rows(transformer)),
                  variant)
    index["transformer"] = ["src.transformer", "Transformer2DModel"]
    write_config(folder / "vqvae", vqmodel_config(pipe.vqvae))
    write_weights(folder / "vqvae", peer_state(pipe.vqvae, vq_keys), variant)
    index["vqvae"] = ["diffusers", "VQModel"]
    save_text_encoder(pipe.text_encoder, folder, index, variant)
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "Scheduler", "_diffusers_version": PEER_DIFFUSERS_VERSION,
                 "mask_token_id": pipe.mask_token_id, "masking_schedule": pipe.masking_schedule}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index["scheduler"] = ["src.scheduler", "Scheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
