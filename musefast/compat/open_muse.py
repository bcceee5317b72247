"""Drop-in for huggingface/open-muse: load its ``MaskGitTransformer``, ``MaskGiTUViT_v2``,
``MaskGitVQGAN`` and (convolutional) ``VQGANModel`` into musefast models (:func:`load` picks by
``_class_name``).

open-muse is not on PyPI and is never imported here: the converter reads what open-muse's
``save_pretrained`` writes — ``config.json`` (every constructor argument) and
``pytorch_model.safetensors`` / ``model.safetensors`` / ``pytorch_model.bin`` — or a state dict
plus that config as a dict.

What maps to what (open-muse ``muse/modeling_transformer.py``):

==========================================  ===================================================
open-muse ``MaskGitTransformer``            musefast ``MuseTransformer``
==========================================  ===================================================
embed.word_embeddings (vocab_size rows,     token_embed: the codebook rows + the [MASK] row;
  [MASK] = vocab_size − 1)                    musefast's [MASK] id is codebook_size
embed.position_embeddings                   pos_embed (text) / rows 1.. (class-conditional)
class token (id codebook_size + c, pos 0)   class_embed[c] = its word + position-0 embeddings
encoder_proj + encoder_proj_layer_norm      text_proj + text_norm (``text_proj="linear_norm"``)
no projection                               ``text_proj="none"`` (K/V read the text width)
attn_layer_norm, attention.query/key/value  norm1, attn.to_qkv = [query; key; value], to_out
post_attn_layer_norm (normformer)           post_norm1 (``post_norm=True``)
crossattn_layer_norm, crossattention.*      norm2, cross_attn.to_q / to_kv = [key; value]
post_crossattn_layer_norm                   post_norm2
ffn.pre_mlp_layer_norm (always LayerNorm)   norm3 (``mlp_norm="layernorm"``)
ffn.wi_0 (GELU), ffn.wi_1 (linear)          mlp.proj_in = [wi_1; wi_0] (geglu: value · GELU(gate))
ffn.mid_mlp_layer_norm (normformer)         mlp.inner_norm
ffn.wo                                      mlp.proj_out
encoder_layer_norm                          norm (``final_norm``)
mlm_layer.mlm_dense → GELU → mlm_ln         head_mlp (``head_mlp``, ``head_mlp_norm``)
mlm_layer.to_logits / to_logits             head: its first codebook_size rows
==========================================  ===================================================

Bias-free LayerNorms and Linears (``use_bias=False``) get zero biases where musefast's module has
one. The logits are open-muse's logits restricted to the codebook (``logits[..., :codebook_size]``,
what its ``generate`` samples from), at the image positions (its class token's row dropped).

Token ids: open-muse's [MASK] id is ``vocab_size − 1`` (e.g. 8255 with vocab_size 8256);
musefast's is ``codebook_size`` — map ids with :func:`to_musefast_ids`. Class ids are plain
0..num_classes−1 (open-muse adds codebook_size itself); musefast's extra null class
(``num_classes``, for guidance) is open-muse's [MASK] embedding in the class slot.

Conditioning: open-muse's ``encoder_attention_mask`` path cannot run (its ``make_attention_mask``
is called with an unknown ``dtype`` argument), so its models attend every text token: call the
musefast model with ``text_mask=None``. Its unconditional branch is all-zero text embeddings
(``generate``) or ``negative_embeds`` (``generate2``).

Not supported (raise): ``use_conv_in_out`` models (ConvEmbed / ConvMlmLayer), unconditional
models (no cross-attention and no classes).

Tokenizer: ``MaskGitVQGAN`` (open-muse's port of google maskgit's VQGAN) -> musefast
:class:`~musefast.models.vqgan.VQGAN` with ``downsample="avgpool"``, ``shortcut="output"`` (its
1x1 skip conv reads the block's output), ``decoder_res_blocks=num_res_blocks``,
``num_mid_blocks=num_res_blocks``, pixels in [0, 1] (``signed_pixels=False``). Its bias-free
convs get zero biases, its 1x1 encoder ``conv_out`` becomes the centre of a 3x3 kernel, and the
absent ``quant_conv`` / ``post_quant_conv`` are identities. Its decoder's ``up`` list is stored
shallowest first; musefast's ``levels`` run deepest first.

U-ViT: ``MaskGiTUViT_v2`` (``MaskGiTUViT``) is the layout diffusers' ``UVit2DModel`` (aMUSEd)
was made from -> musefast :class:`~musefast.models.uvit.UVit2D`, a key mapping: its fused-residual
norms compute the ordinary pre-norm residuals, ``force_down_up_sample`` is ``downsample`` and
``upsample``, 1x1 convs become Linears, q/k/v concatenate; ids, the [MASK] id (vocab_size − 1)
and the conditioning (``encoder_hidden_states``, pooled ``cond_embeds``, ``micro_conds``) are
the same. Logits come as (B, h, w, K) instead of (B, h·w, K). Supported: ``norm_type="rmsnorm"``
with affine norms and eps 1e-6 (the aMUSEd layout), without ``use_fused_mlp``.

The taming ``VQGANModel`` tokenizer is musefast's VQGAN layout (a key rename: ``mid.block_1``/
``block_2``, ``downsample.conv``, ``upsample.conv``, ``nin_shortcut``) when it is convolutional
(``no_attn_mid_block=True`` and no level resolution in ``attn_resolutions``, as the aMUSEd VQ);
with attention blocks it raises. Both VQGANs need ``channel_mult[0] == 1``.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from musefast.compat._convert import ConversionError, check_keys, load_strict
from musefast.models.transformer import MuseTransformer, MuseTransformerConfig
from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.models.vqgan import VQGAN, VQGANConfig

__all__ = ["load", "load_transformer", "convert_transformer", "load_vqgan", "convert_vqgan", "load_uvit",
           "convert_uvit", "read_folder", "to_musefast_ids", "PRESET"]

# the musefast.sampling preset nearest open-muse's generate2 (google maskgit's decoding: tau = 1,
# cosine schedule, maskgit mask counts); generate2 anneals its choice temperature cumulatively
# (t <- t * (1 - r) at every step), which no preset reproduces exactly
PRESET = "maskgit"

_WEIGHT_FILES = ("pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.safetensors",
                 "pytorch_model.bin")
# MaskGitTransformer's constructor defaults (a config.json written by it holds every one of them)
_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=256, add_cross_attention=False, encoder_hidden_size=1024,
                 project_encoder_hidden_states=False, norm_type="layernorm", layer_norm_eps=1e-5,
                 use_normformer=True, use_encoder_layernorm=True, use_mlm_layer=True, use_mlm_layernorm=True,
                 use_bias=False, codebook_size=1024, num_vq_tokens=256, num_classes=None,
                 use_codebook_size_for_output=False, use_conv_in_out=False)


def read_folder(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) of an open-muse model folder (``config.json`` + one weight file).
    ``.bin`` weights are read with ``torch.load(weights_only=True)``."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    for name in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            break
    else:
        raise FileNotFoundError(f"{folder}: no weight file (looked for {', '.join(_WEIGHT_FILES)})")
    if path.endswith(".bin"):
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(path)
    return state, config


def to_musefast_ids(ids: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """open-muse image token ids ([MASK] = vocab_size − 1) -> musefast ids ([MASK] = codebook_size)."""
    cfg = {**_DEFAULTS, **config}
    mask_id = config.get("mask_token_id", cfg["vocab_size"] - 1)
    bad = (ids >= cfg["codebook_size"]) & (ids != mask_id)
    if bad.any():
        raise ValueError(f"ids must be codebook ids (< {cfg['codebook_size']}) or the [MASK] id {mask_id}, "
                         f"got {ids[bad].unique().tolist()[:8]}")
    return torch.where(ids == mask_id, cfg["codebook_size"], ids)


def _musefast_config(cfg: Mapping[str, Any], backend: str | None) -> MuseTransformerConfig:
    if cfg["use_conv_in_out"]:
        raise ValueError("open-muse transformers with use_conv_in_out=True (ConvEmbed/ConvMlmLayer) are not supported")
    classes = cfg["num_classes"]
    if cfg["add_cross_attention"] and classes:
        raise ValueError("open-muse config has both add_cross_attention and num_classes: ambiguous conditioning")
    if not cfg["add_cross_attention"] and not classes:
        raise ValueError("unconditional open-muse transformers (no cross-attention, no num_classes) are not supported")
    K, V, seq = cfg["codebook_size"], cfg["vocab_size"], cfg["num_vq_tokens"]
    if V - 1 < K + (classes or 0):
        raise ValueError(f"vocab_size={V} leaves no [MASK] id after {K} codebook ids and {classes or 0} classes")
    grid = math.isqrt(seq)
    if grid * grid != seq:
        raise ValueError(f"num_vq_tokens={seq} is not a square grid")
    if cfg["max_position_embeddings"] < seq + (1 if classes else 0):
        raise ValueError(f"max_position_embeddings={cfg['max_position_embeddings']} < the sequence length")
    text = bool(cfg["add_cross_attention"])
    project = text and cfg["project_encoder_hidden_states"]
    return MuseTransformerConfig(
        codebook_size=K, grid_size=grid, dim=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], text_dim=cfg["encoder_hidden_size"] if text else None,
        num_classes=None if text else classes, mlp="geglu", mlp_hidden_dim=cfg["intermediate_size"],
        mlp_inner_norm=cfg["use_normformer"], norm=cfg["norm_type"], norm_eps=cfg["layer_norm_eps"],
        bias=cfg["use_bias"], post_norm=cfg["use_normformer"], mlp_norm="layernorm",
        text_proj=("linear_norm" if project else "none") if text else "linear",
        final_norm=cfg["use_encoder_layernorm"], head_mlp=cfg["use_mlm_layer"],
        head_mlp_norm=cfg["use_mlm_layernorm"], backend=backend,
    )


def _taker(state: Mapping[str, torch.Tensor], used: set[str], source: str):
    """``take(key)``: ``state[key]``, recorded in ``used``; a missing key raises naming ``source``."""

    def take(key):
        if key not in state:
            raise ConversionError(f"{source}: missing key {key!r} (found {len(state)} keys, e.g. {sorted(state)[:5]})")
        used.add(key)
        return state[key]

    return take


def _convert_state(state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any],
                   mcfg: MuseTransformerConfig, model: MuseTransformer) -> dict[str, torch.Tensor]:
    used: set[str] = set()
    own = model.state_dict()

    take = _taker(state, used, "open-muse MaskGitTransformer")

    def linear(src, dst):
        out[f"{dst}.weight"] = take(f"{src}.weight")
        if f"{dst}.bias" in own:  # bias-free open-muse Linear -> zero bias
            out[f"{dst}.bias"] = take(f"{src}.bias") if f"{src}.bias" in state else torch.zeros(own[f"{dst}.bias"].shape)

    def norm(src, dst):
        out[f"{dst}.weight"] = take(f"{src}.weight")
        if f"{dst}.bias" in own:  # open-muse's LayerNorm has no bias unless use_bias
            out[f"{dst}.bias"] = take(f"{src}.bias") if f"{src}.bias" in state else torch.zeros(own[f"{dst}.bias"].shape)

    K, V, classes, seq = cfg["codebook_size"], cfg["vocab_size"], cfg["num_classes"], mcfg.seq_len
    mask_id = cfg.get("mask_token_id", V - 1)
    words, pos = take("embed.word_embeddings.weight"), take("embed.position_embeddings.weight")
    out: dict[str, torch.Tensor] = {"token_embed.weight": torch.cat([words[:K], words[mask_id: mask_id + 1]])}
    if classes:  # class token at position 0, image tokens at 1..seq
        class_rows = torch.cat([words[K: K + classes], words[mask_id: mask_id + 1]])
        out["class_embed.weight"] = class_rows + pos[0]
        out["pos_embed"] = pos[None, 1: 1 + seq]
    else:
        out["pos_embed"] = pos[None, :seq]
        if mcfg.text_proj == "linear_norm":
            linear("encoder_proj", "text_proj")
            norm("encoder_proj_layer_norm", "text_norm")
    for i in range(mcfg.depth):
        src, dst = f"transformer_layers.{i}", f"blocks.{i}"
        norm(f"{src}.attn_layer_norm", f"{dst}.norm1")
        qkv = [f"{src}.attention.{n}" for n in ("query", "key", "value")]
        out[f"{dst}.attn.to_qkv.weight"] = torch.cat([take(f"{k}.weight") for k in qkv])
        if mcfg.bias:
            out[f"{dst}.attn.to_qkv.bias"] = torch.cat([take(f"{k}.bias") for k in qkv])
        linear(f"{src}.attention.out", f"{dst}.attn.to_out")
        if mcfg.post_norm:
            norm(f"{src}.post_attn_layer_norm", f"{dst}.post_norm1")
        if mcfg.text_dim is not None:
            a = f"{src}.crossattention"
            norm(f"{src}.crossattn_layer_norm", f"{dst}.norm2")
            linear(f"{a}.query", f"{dst}.cross_attn.to_q")
            out[f"{dst}.cross_attn.to_kv.weight"] = torch.cat([take(f"{a}.key.weight"), take(f"{a}.value.weight")])
            if mcfg.bias:
                out[f"{dst}.cross_attn.to_kv.bias"] = torch.cat([take(f"{a}.key.bias"), take(f"{a}.value.bias")])
            linear(f"{a}.out", f"{dst}.cross_attn.to_out")
            if mcfg.post_norm:
                norm(f"{src}.post_crossattn_layer_norm", f"{dst}.post_norm2")
        ff = f"{src}.ffn"
        norm(f"{ff}.pre_mlp_layer_norm", f"{dst}.norm3")
        out[f"{dst}.mlp.proj_in.weight"] = torch.cat([take(f"{ff}.wi_1.weight"), take(f"{ff}.wi_0.weight")])
        if mcfg.bias:
            out[f"{dst}.mlp.proj_in.bias"] = torch.cat([take(f"{ff}.wi_1.bias"), take(f"{ff}.wi_0.bias")])
        if mcfg.mlp_inner_norm:
            norm(f"{ff}.mid_mlp_layer_norm", f"{dst}.mlp.inner_norm")
        linear(f"{ff}.wo", f"{dst}.mlp.proj_out")
    if mcfg.final_norm:
        norm("encoder_layer_norm", "norm")
    head = "to_logits"
    if mcfg.head_mlp:
        linear("mlm_layer.mlm_dense", "head_mlp.0")
        if mcfg.head_mlp_norm:
            norm("mlm_layer.mlm_ln", "head_mlp.2")
        head = "mlm_layer.to_logits"
    logits_w = take(f"{head}.weight")
    out["head.weight"] = logits_w[:K]
    out["head.bias"] = take(f"{head}.bias")[:K] if f"{head}.bias" in state else torch.zeros(K)
    # an encoder_proj exists (unused) when project_encoder_hidden_states is set without cross-attention
    ignored = {k for k in state if k.startswith(("encoder_proj.", "encoder_proj_layer_norm.")) and not mcfg.text_dim}
    check_keys("open-muse MaskGitTransformer", state, used=used, ignored=ignored)
    return out


def convert_transformer(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
                        backend: str | None = None) -> MuseTransformer:
    """An open-muse ``MaskGitTransformer`` state dict + its config (the ``config.json`` dict or
    constructor kwargs) -> a musefast :class:`MuseTransformer` with the same logits (over the
    codebook, at the image positions). Unknown keys or shape mismatches raise
    :class:`~musefast.compat._convert.ConversionError` listing them."""
    name = config.get("_class_name", "MaskGitTransformer")
    if name != "MaskGitTransformer":
        raise ValueError(f"expected an open-muse MaskGitTransformer config, got _class_name={name!r}")
    if "vocab_size" not in config:
        raise ValueError("config needs vocab_size (codebook ids + classes + [MASK])")
    cfg = {**_DEFAULTS, **config}
    mcfg = _musefast_config(cfg, backend)
    model = MuseTransformer(mcfg)
    load_strict(model, _convert_state(state, cfg, mcfg, model), source="open-muse MaskGitTransformer -> MuseTransformer")
    return model.eval()


def load_transformer(folder: str | os.PathLike, *, backend: str | None = None) -> MuseTransformer:
    """An open-muse ``MaskGitTransformer`` folder (``config.json`` + weights) -> :class:`MuseTransformer`."""
    state, config = read_folder(folder)
    return convert_transformer(state, config, backend=backend)


# MaskGitVQGAN's and VQGANModel's constructor defaults (the same numbers)
_VQ_DEFAULTS = dict(resolution=256, num_channels=3, hidden_channels=128, channel_mult=(1, 1, 2, 2, 4),
                    num_res_blocks=2, attn_resolutions=(16,), no_attn_mid_block=False, z_channels=256,
                    num_embeddings=1024, quantized_embed_dim=256, resample_with_conv=True, commitment_cost=0.25)
_VQ_CLASSES = ("MaskGitVQGAN", "VQGANModel")


def _vqgan_config(cfg: Mapping[str, Any], maskgit: bool) -> VQGANConfig:
    if cfg["channel_mult"][0] != 1:  # its conv_in outputs hidden_channels, musefast's channels * channel_mult[0]
        raise ValueError(f"open-muse VQGANs with channel_mult[0] != 1 are not supported, got {tuple(cfg['channel_mult'])}")
    n = cfg["num_res_blocks"]
    common = dict(in_channels=cfg["num_channels"], channels=cfg["hidden_channels"],
                  channel_mult=tuple(cfg["channel_mult"]), num_res_blocks=n, z_channels=cfg["z_channels"],
                  embed_dim=cfg["quantized_embed_dim"], codebook_size=cfg["num_embeddings"], norm_groups=32,
                  signed_pixels=False, commitment_beta=cfg["commitment_cost"])
    if maskgit:
        if cfg["quantized_embed_dim"] != cfg["z_channels"]:
            raise ValueError(f"MaskGitVQGAN has no quant_conv: quantized_embed_dim ({cfg['quantized_embed_dim']}) "
                             f"must equal z_channels ({cfg['z_channels']})")
        return VQGANConfig(**common, num_mid_blocks=n, downsample="avgpool", shortcut="output", decoder_res_blocks=n)
    levels = len(cfg["channel_mult"])  # VQGANModel: attention where a level's resolution is listed
    attn = sorted({cfg["resolution"] // 2**i for i in range(levels)} & set(cfg["attn_resolutions"] or ()))
    if attn or not cfg["no_attn_mid_block"]:
        raise ValueError("VQGANModel with attention blocks is not supported (musefast's VQGAN is convolutional): "
                         f"attention at resolutions {attn}, no_attn_mid_block={cfg['no_attn_mid_block']}")
    if not cfg["resample_with_conv"]:
        raise ValueError("VQGANModel with resample_with_conv=False (upsampling without a conv) is not supported")
    return VQGANConfig(**common, num_mid_blocks=2, downsample="conv")


def _vqgan_key(key: str, levels: int) -> str | None:
    """MaskGitVQGAN / VQGANModel key -> VQGAN key (None: not a key of either layout)."""
    m = re.fullmatch(r"encoder\.down\.(\d+)\.(block\.(\d+)\.(.+)|downsample\.conv\.(weight|bias))", key)
    if m:
        if m[5]:
            return f"encoder.levels.{m[1]}.resample.conv.{m[5]}"
        return f"encoder.levels.{m[1]}.blocks.{m[3]}.{m[4]}".replace("nin_shortcut", "shortcut")
    m = re.fullmatch(r"decoder\.up\.(\d+)\.(block\.(\d+)\.(.+)|upsample_conv\.(weight|bias)|upsample\.conv\.(weight|bias))", key)
    if m:  # open-muse keeps up[i] = level i (shallowest first); musefast runs deepest first
        level = levels - 1 - int(m[1])
        if m[5] or m[6]:
            return f"decoder.levels.{level}.resample.conv.{m[5] or m[6]}"
        return f"decoder.levels.{level}.blocks.{m[3]}.{m[4]}".replace("nin_shortcut", "shortcut")
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(\d+|block_1|block_2)\.(.+)", key)
    if m:  # MaskGitVQGAN: mid.<j>; VQGANModel: mid.block_1 / mid.block_2
        index = {"block_1": "0", "block_2": "1"}.get(m[2], m[2])
        return f"{m[1]}.mid.{index}.{m[3]}".replace("nin_shortcut", "shortcut")
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(weight|bias)|quantize\.embedding\.weight"
                    r"|(post_)?quant_conv\.(weight|bias)", key):
        return key
    return None


def convert_vqgan(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
                  vq_backend: str | None = None) -> VQGAN:
    """An open-muse ``MaskGitVQGAN`` or (convolutional) ``VQGANModel`` state dict + its config ->
    a musefast :class:`VQGAN` with the same tokens and reconstructions (images in [0, 1], as
    open-muse feeds them)."""
    name = config.get("_class_name", "MaskGitVQGAN")
    if name not in _VQ_CLASSES:
        raise ValueError(f"expected an open-muse MaskGitVQGAN or VQGANModel config, got _class_name={name!r}")
    maskgit = name == "MaskGitVQGAN"
    cfg = {**_VQ_DEFAULTS, **config}
    vcfg = _vqgan_config(cfg, maskgit)
    model = VQGAN(vcfg, vq_backend=vq_backend)
    own = model.state_dict()
    levels = len(vcfg.channel_mult)
    out, unknown = {}, []
    for key, value in state.items():
        new = _vqgan_key(key, levels)
        if new is None or (maskgit and "quant_conv" in new):
            unknown.append(key)
        else:
            out[new] = value
    check_keys(f"open-muse {name}", state, used=set(state) - set(unknown))
    if maskgit:
        conv_out = out.get("encoder.conv_out.weight")
        if conv_out is not None and conv_out.shape[-2:] == (1, 1):  # 1x1 conv = centre of a zero 3x3 kernel
            out["encoder.conv_out.weight"] = torch.nn.functional.pad(conv_out, (1, 1, 1, 1))
        for key in own:  # its residual convs and encoder conv_in carry no bias
            bias_free = re.search(r"\.(conv1|conv2|shortcut)\.bias$", key) or key == "encoder.conv_in.bias"
            if bias_free and key not in out and key[: -len("bias")] + "weight" in out:
                out[key] = torch.zeros(own[key].shape)
        for conv in ("quant_conv", "post_quant_conv"):  # absent in MaskGitVQGAN: identities
            out[f"{conv}.weight"] = torch.eye(vcfg.embed_dim)[:, :, None, None]
            out[f"{conv}.bias"] = torch.zeros(vcfg.embed_dim)
    load_strict(model, out, source=f"open-muse {name} -> VQGAN")
    return model.eval()


def load_vqgan(folder: str | os.PathLike, *, vq_backend: str | None = None) -> VQGAN:
    """An open-muse ``MaskGitVQGAN`` / ``VQGANModel`` folder (``config.json`` + weights) -> :class:`VQGAN`."""
    state, config = read_folder(folder)
    return convert_vqgan(state, config, vq_backend=vq_backend)


# MaskGiTUViT_v2Config's defaults
_UVIT_DEFAULTS = dict(hidden_size=1024, use_bias=False, hidden_dropout=0.0, cond_embed_dim=768, micro_cond_encode_dim=256,
                      micro_cond_embed_dim=1280, encoder_hidden_size=768, vocab_size=8256, codebook_size=8192,
                      in_channels=768, block_out_channels=(768,), num_res_blocks=3, force_down_up_sample=False,
                      block_num_heads=12, num_hidden_layers=22, num_attention_heads=16, attention_dropout=0.0,
                      intermediate_size=2816, use_fused_mlp=False, norm_type="rmsnorm", layer_norm_eps=1e-6,
                      ln_elementwise_affine=True)
_UVIT_CLASSES = ("MaskGiTUViT_v2", "MaskGiTUViT")


def _uvit_config(cfg: Mapping[str, Any], backend: str | None) -> UVit2DConfig:
    problems = []
    if cfg["norm_type"] != "rmsnorm":
        problems.append(f"norm_type={cfg['norm_type']!r} (only 'rmsnorm')")
    if cfg["use_fused_mlp"]:
        problems.append("use_fused_mlp=True (a tanh-GELU MLP, not the GLU one)")
    if not cfg["ln_elementwise_affine"]:
        problems.append("ln_elementwise_affine=False")
    if cfg["layer_norm_eps"] != 1e-6:
        problems.append(f"layer_norm_eps={cfg['layer_norm_eps']} (only 1e-6)")
    blocks = cfg["block_out_channels"]
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else [blocks]
    if len(blocks) != 1:
        problems.append(f"block_out_channels={blocks} (one block width)")
    heads = cfg["block_num_heads"]
    heads = heads[0] if isinstance(heads, (list, tuple)) and len(heads) == 1 else heads
    if problems:
        raise ValueError("unsupported open-muse MaskGiTUViT_v2 config: " + "; ".join(problems))
    return UVit2DConfig(
        hidden_size=cfg["hidden_size"], use_bias=cfg["use_bias"], hidden_dropout=cfg["hidden_dropout"],
        cond_embed_dim=cfg["cond_embed_dim"], micro_cond_encode_dim=cfg["micro_cond_encode_dim"],
        micro_cond_embed_dim=cfg["micro_cond_embed_dim"], encoder_hidden_size=cfg["encoder_hidden_size"],
        vocab_size=cfg["vocab_size"], codebook_size=cfg["codebook_size"], in_channels=cfg["in_channels"],
        block_out_channels=blocks[0], num_res_blocks=cfg["num_res_blocks"],
        downsample=cfg["force_down_up_sample"], upsample=cfg["force_down_up_sample"], block_num_heads=heads,
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        attention_dropout=cfg["attention_dropout"], intermediate_size=cfg["intermediate_size"],
        layer_norm_eps=cfg["layer_norm_eps"], ln_elementwise_affine=True, backend=backend)


def _uvit_state(state: Mapping[str, torch.Tensor], ucfg: UVit2DConfig) -> dict[str, torch.Tensor]:
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    leaves = ("weight", "bias") if ucfg.use_bias else ("weight",)

    take = _taker(state, used, "open-muse MaskGiTUViT_v2")

    def copy(src, dst, *, conv1x1=False, norm=False):
        for leaf in ("weight",) if norm else leaves:
            value = take(f"{src}.{leaf}")
            out[f"{dst}.{leaf}"] = value[:, :, 0, 0] if conv1x1 and leaf == "weight" else value

    def attention(src, dst, fused_qkv):
        for leaf in leaves:
            q, k, v = (take(f"{src}.{n}.{leaf}") for n in ("query", "key", "value"))
            if fused_qkv:
                out[f"{dst}.to_qkv.{leaf}"] = torch.cat([q, k, v])
            else:
                out[f"{dst}.to_q.{leaf}"], out[f"{dst}.to_kv.{leaf}"] = q, torch.cat([k, v])
        copy(f"{src}.out", f"{dst}.to_out")

    copy("encoder_proj", "encoder_proj")
    copy("encoder_proj_layer_norm", "encoder_proj_layer_norm", norm=True)
    out["embed.embeddings.weight"] = take("embed.embeddings.weight")
    copy("embed.layer_norm", "embed.layer_norm", norm=True)
    copy("embed.conv", "embed.conv", conv1x1=True)
    copy("cond_embed.0", "cond_embed.linear_1")
    copy("cond_embed.2", "cond_embed.linear_2")
    for src, dst in (("down_blocks.0", "down_block"), ("up_blocks.0", "up_block")):
        for i in range(ucfg.num_res_blocks):
            r, m = f"{src}.res_blocks.{i}", f"{dst}.res_blocks.{i}"
            copy(f"{r}.depthwise", f"{m}.depthwise")
            copy(f"{r}.norm.norm", f"{m}.norm", norm=True)
            copy(f"{r}.channelwise.0", f"{m}.channelwise_linear_1")
            for leaf in ("gamma", "beta"):
                out[f"{m}.channelwise_norm.{leaf}"] = take(f"{r}.channelwise.2.{leaf}")
            copy(f"{r}.channelwise.4", f"{m}.channelwise_linear_2")
            copy(f"{r}.adaLN_modulation.mapper", f"{m}.cond_embeds_mapper")
            a, m = f"{src}.attention_blocks.{i}", f"{dst}.attention_blocks.{i}"
            if ucfg.hidden_size != ucfg.block_out_channels:
                copy(f"{a}.kv_mapper", f"{m}.kv_mapper")
            copy(f"{a}.attn_layer_norm", f"{m}.norm1", norm=True)
            attention(f"{a}.attention", f"{m}.attn1", fused_qkv=False)
            copy(f"{a}.crossattn_layer_norm", f"{m}.norm2", norm=True)
            attention(f"{a}.crossattention", f"{m}.attn2", fused_qkv=False)
    if ucfg.downsample:
        copy("down_blocks.0.downsample.0.norm", "down_block.downsample.norm", norm=True)
        copy("down_blocks.0.downsample.1", "down_block.downsample.conv")
    if ucfg.upsample:
        copy("up_blocks.0.upsample.0.norm", "up_block.upsample.norm", norm=True)
        copy("up_blocks.0.upsample.1", "up_block.upsample.conv")
    for name in ("project_to_hidden", "project_from_hidden"):
        copy(f"{name}_norm", f"{name}_norm", norm=True)
        copy(name, name)
    for i in range(ucfg.num_hidden_layers):
        t, m = f"transformer_layers.{i}", f"transformer_layers.{i}"
        copy(f"{t}.attn_layer_norm", f"{m}.norm1.norm", norm=True)
        copy(f"{t}.self_attn_adaLN_modulation.mapper", f"{m}.norm1.linear")
        attention(f"{t}.attention", f"{m}.attn1", fused_qkv=True)
        copy(f"{t}.crossattn_layer_norm", f"{m}.norm2.norm", norm=True)
        copy(f"{t}.cross_attn_adaLN_modulation.mapper", f"{m}.norm2.linear")
        attention(f"{t}.crossattention", f"{m}.attn2", fused_qkv=False)
        copy(f"{t}.ffn.pre_mlp_layer_norm", f"{m}.norm3.norm")  # a LayerNorm (bias with use_bias)
        copy(f"{t}.ffn.adaLN_modulation.mapper", f"{m}.norm3.linear")
        for leaf in leaves:  # open-muse: GELU(wi_0) * wi_1; musefast geglu: value * GELU(gate)
            out[f"{m}.ff.proj_in.{leaf}"] = torch.cat([take(f"{t}.ffn.wi_1.{leaf}"), take(f"{t}.ffn.wi_0.{leaf}")])
        copy(f"{t}.ffn.wo", f"{m}.ff.proj_out")
    copy("mlm_layer.conv1", "mlm_layer.conv1", conv1x1=True)
    copy("mlm_layer.layer_norm.norm", "mlm_layer.layer_norm", norm=True)
    copy("mlm_layer.conv2", "mlm_layer.conv2", conv1x1=True)
    check_keys("open-muse MaskGiTUViT_v2", state, used=used)
    return out


def convert_uvit(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
                 backend: str | None = None) -> UVit2D:
    """An open-muse ``MaskGiTUViT_v2`` state dict + its config -> a musefast :class:`UVit2D` with
    the same logits (reshaped to (B, h, w, K))."""
    name = config.get("_class_name", "MaskGiTUViT_v2")
    if name not in _UVIT_CLASSES:
        raise ValueError(f"expected an open-muse MaskGiTUViT_v2 config, got _class_name={name!r}")
    ucfg = _uvit_config({**_UVIT_DEFAULTS, **config}, backend)
    model = UVit2D(ucfg)
    load_strict(model, _uvit_state(state, ucfg), source="open-muse MaskGiTUViT_v2 -> UVit2D")
    return model.eval()


def load_uvit(folder: str | os.PathLike, *, backend: str | None = None) -> UVit2D:
    """An open-muse ``MaskGiTUViT_v2`` folder (``config.json`` + weights) -> :class:`UVit2D`."""
    state, config = read_folder(folder)
    return convert_uvit(state, config, backend=backend)


def load(folder: str | os.PathLike, *, backend: str | None = None) -> MuseTransformer | UVit2D | VQGAN:
    """Any supported open-muse model folder, converted by its ``config.json``'s ``_class_name``
    (``backend``: of the attention op for transformers, of the vq op for VQGANs)."""
    state, config = read_folder(folder)
    name = config.get("_class_name")
    if name == "MaskGitTransformer":
        return convert_transformer(state, config, backend=backend)
    if name in _UVIT_CLASSES:
        return convert_uvit(state, config, backend=backend)
    if name in _VQ_CLASSES:
        return convert_vqgan(state, config, vq_backend=backend)
    raise ValueError(f"{folder}: unsupported open-muse model _class_name={name!r}; supported: MaskGitTransformer, "
                     f"{', '.join(_UVIT_CLASSES + _VQ_CLASSES)}")
