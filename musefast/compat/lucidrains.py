"""Drop-in for lucidrains' muse-maskgit-pytorch: convert its models to musefast models.

Accepted sources (the peer package itself is never imported here, only its objects' state):

* a ``MaskGitTransformer`` (or ``Transformer`` with ``add_mask_id=True``), a ``MaskGit``, or
  their ``state_dict()`` (``MaskGit``'s keys carry a ``transformer.`` prefix). Every
  architecture number is read from the weights; constructor kwargs may be passed to
  cross-check them.
* a ``VQGanVAE`` with lookup-free quantization, or its ``state_dict()`` plus its constructor
  kwargs (the LFQ settings are not in the weights).

What maps to what (muse-maskgit-pytorch 0.3.x layout):

=====================================  ==============================================
muse-maskgit-pytorch                   musefast ``MuseTransformer``
=====================================  ==============================================
token_emb (K + 1 rows, mask id = K)    token_embed (mask id = codebook_size = K)
pos_emb (seq_len rows)                 pos_embed (first grid² rows)
text_embed_proj (Linear / Identity)    text_proj (bias 0; identity weight for Identity)
layer.0 / layer.1 (self / cross)       attn / cross_attn with ``qk_norm="l2"``,
  norm (LayerNorm, buffer beta)          norm1 / norm2 (LayerNorm, eps 1e-5)
  to_q, to_kv                            to_qkv = [to_q; to_kv] / to_q, to_kv
  q_scale, k_scale, null_kv, scale 8     q_norm.weight, k_norm.weight, null_kv, attn_scale 8
layer.2 FeedForward (GEGLU, inner LN)  norm3, mlp (geglu halves swapped, inner_norm)
transformer_blocks.norm, to_logits     norm, head (bias 0)
=====================================  ==============================================

``Transformer.norm`` and ``self_cond_to_init_embed`` exist in every checkpoint but play no
part in the logits (the first is never called, the second only with self-conditioning,
which musefast's sampler does not do): they are dropped. Any other key that is not used
raises :class:`~musefast.compat._convert.ConversionError` listing it.

Conditioning: muse-maskgit-pytorch derives the text key mask from the embeddings —
``(text_embeds != 0).any(-1)`` (its T5 wrapper zeroes padding) — see :func:`text_mask`. Its
classifier-free-guidance null branch (``cond_drop_prob=1``) masks every text key, leaving
the learned null key/value (and, in super-res, the low-res tokens): pass
``null_text_mask(text_embeds)`` as the text mask for the unconditional pass. Its super-res
MaskGit appends the token embeddings of the low-res ids (the same embedding table, no
position embedding, no norm) to the cross-attention context: that is a musefast
``SuperResTransformer`` with ``encoder_depth=0``, ``low_norm=False`` and a zero low-res
position embedding. Its sampler is the ``lucidrains`` preset of ``musefast.sampling``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from musefast.compat._convert import ConversionError, check_keys, load_strict, strip_prefix
from musefast.models.transformer import MuseTransformer, MuseTransformerConfig, SuperResConfig, SuperResTransformer

__all__ = [
    "convert_transformer",
    "convert_superres_transformer",
    "convert_maskgit",
    "convert_vae",
    "text_mask",
    "null_text_mask",
    "PRESET",
]

PRESET = "lucidrains"  # musefast.sampling preset reproducing MaskGit.generate

_ATTN_SCALE = 8.0  # muse-maskgit-pytorch's Attention(scale=8), not exposed by its Transformer
_NORM_EPS = 1e-5  # its LayerNorm calls F.layer_norm with the default eps
_UNUSED_PREFIXES = ("norm.", "self_cond_to_init_embed.")


def text_mask(text_embeds: torch.Tensor) -> torch.Tensor:
    """(B, L, D) text embeddings -> (B, L) bool key mask, True where a row is not all zeros
    (how muse-maskgit-pytorch masks T5 padding)."""
    return (text_embeds != 0).any(dim=-1)


def null_text_mask(text_embeds: torch.Tensor) -> torch.Tensor:
    """The text mask of muse-maskgit-pytorch's unconditional (null) branch: every key masked."""
    return torch.zeros(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)


def _state_of(source: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(transformer state dict, attributes read from the object) of a module or a state dict."""
    attrs: dict[str, Any] = {}
    if isinstance(source, nn.Module):
        net = getattr(source, "transformer", source)  # MaskGit -> its transformer
        for name in ("self_cond", "dim_out", "num_tokens", "mask_id", "seq_len"):
            if hasattr(net, name):
                attrs[name] = getattr(net, name)
        state = net.state_dict()
    elif isinstance(source, Mapping):
        state = strip_prefix(source, "transformer.")
        state = {k: v for k, v in state.items() if not k.startswith(("vae.", "cond_vae.", "token_critic."))}
    else:
        raise TypeError(f"source must be a muse-maskgit-pytorch module or a state dict, got {type(source).__name__}")
    return state, attrs


def _need(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"muse-maskgit-pytorch transformer: missing key {key!r} "
                              f"(found {len(state)} keys, e.g. {sorted(state)[:5]})")
    return state[key]


def _infer_config(state: Mapping[str, torch.Tensor], attrs: Mapping[str, Any], kwargs: Mapping[str, Any],
                  grid_size: int | None, backend: str | None) -> MuseTransformerConfig:
    if attrs.get("self_cond") or kwargs.get("self_cond"):
        raise ValueError("self-conditioned muse-maskgit-pytorch transformers (self_cond=True) are not supported: "
                         "musefast's sampler does not feed the previous step's embeddings back")
    if attrs.get("mask_id", 0) is None:
        raise ValueError("the transformer has no [MASK] id (add_mask_id=False): convert a MaskGitTransformer")
    tokens = _need(state, "token_emb.weight")
    pos = _need(state, "pos_emb.weight")
    logits = _need(state, "to_logits.weight")
    null_kv = _need(state, "transformer_blocks.layers.0.0.null_kv")
    ff_in = _need(state, "transformer_blocks.layers.0.2.1.weight")
    num_tokens, dim = tokens.shape[0] - 1, tokens.shape[1]
    if logits.shape[0] != num_tokens:
        raise ConversionError(f"to_logits has {logits.shape[0]} outputs, expected num_tokens={num_tokens} "
                              "(token critics, dim_out != num_tokens, are not masked transformers)")
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer_blocks.layers."))
    heads, head_dim = null_kv.shape[1], null_kv.shape[3]
    proj = state.get("text_embed_proj.weight")
    text_dim = dim if proj is None else proj.shape[1]
    seq_len = pos.shape[0]
    if grid_size is None:
        grid_size = math.isqrt(seq_len)
        if grid_size * grid_size != seq_len:
            raise ValueError(f"seq_len={seq_len} is not a square: pass grid_size (tokens per side)")
    if grid_size * grid_size > seq_len:
        raise ValueError(f"grid_size={grid_size} needs {grid_size ** 2} positions, the checkpoint has {seq_len}")
    inferred = {"num_tokens": num_tokens, "dim": dim, "depth": depth, "heads": heads, "dim_head": head_dim,
                "seq_len": seq_len}
    wrong = [f"{k}={kwargs[k]} (weights say {v})" for k, v in inferred.items() if k in kwargs and kwargs[k] != v]
    if "ff_mult" in kwargs and int(dim * kwargs["ff_mult"] * 2 / 3) != ff_in.shape[0] // 2:
        wrong.append(f"ff_mult={kwargs['ff_mult']} (weights say hidden {ff_in.shape[0] // 2})")
    if wrong:
        raise ConversionError("constructor kwargs disagree with the weights: " + ", ".join(wrong))
    return MuseTransformerConfig(
        codebook_size=num_tokens, grid_size=grid_size, dim=dim, depth=depth, num_heads=heads, head_dim=head_dim,
        text_dim=text_dim, mlp="geglu", mlp_hidden_dim=ff_in.shape[0] // 2, mlp_inner_norm=True,
        norm="layernorm", norm_eps=_NORM_EPS, qk_norm="l2", bias=False, attn_scale=_ATTN_SCALE, null_kv=True,
        backend=backend,
    )


def _convert_state(state: Mapping[str, torch.Tensor], cfg: MuseTransformerConfig) -> dict[str, torch.Tensor]:
    """muse-maskgit-pytorch transformer keys -> MuseTransformer keys (raises on unknown keys)."""
    used: set[str] = set()

    def take(key):
        used.add(key)
        return _need(state, key)

    out = {
        "token_embed.weight": take("token_emb.weight"),
        "pos_embed": take("pos_emb.weight")[None, : cfg.seq_len],
        "norm.weight": take("transformer_blocks.norm.gamma"),
        "norm.bias": take("transformer_blocks.norm.beta"),
        "head.weight": take("to_logits.weight"),
    }
    out["head.bias"] = torch.zeros(cfg.codebook_size, dtype=out["head.weight"].dtype)
    if "text_embed_proj.weight" in state:
        out["text_proj.weight"] = take("text_embed_proj.weight")
    else:  # nn.Identity: text width == model width
        out["text_proj.weight"] = torch.eye(cfg.dim, dtype=out["token_embed.weight"].dtype)
    out["text_proj.bias"] = torch.zeros(cfg.dim, dtype=out["text_proj.weight"].dtype)
    for i in range(cfg.depth):
        src, dst = f"transformer_blocks.layers.{i}", f"blocks.{i}"
        for j, (attn, norm) in enumerate((("attn", "norm1"), ("cross_attn", "norm2"))):
            a = f"{src}.{j}"
            out[f"{dst}.{norm}.weight"] = take(f"{a}.norm.gamma")
            out[f"{dst}.{norm}.bias"] = take(f"{a}.norm.beta")
            out[f"{dst}.{attn}.null_kv"] = take(f"{a}.null_kv")
            out[f"{dst}.{attn}.q_norm.weight"] = take(f"{a}.q_scale")
            out[f"{dst}.{attn}.k_norm.weight"] = take(f"{a}.k_scale")
            out[f"{dst}.{attn}.to_out.weight"] = take(f"{a}.to_out.weight")
            if attn == "attn":
                out[f"{dst}.attn.to_qkv.weight"] = torch.cat([take(f"{a}.to_q.weight"), take(f"{a}.to_kv.weight")])
            else:
                out[f"{dst}.cross_attn.to_q.weight"] = take(f"{a}.to_q.weight")
                out[f"{dst}.cross_attn.to_kv.weight"] = take(f"{a}.to_kv.weight")
        ff = f"{src}.2"
        out[f"{dst}.norm3.weight"] = take(f"{ff}.0.gamma")
        out[f"{dst}.norm3.bias"] = take(f"{ff}.0.beta")
        gelu_half, gate_half = take(f"{ff}.1.weight").chunk(2)  # its GEGLU: gate · gelu(first half)
        out[f"{dst}.mlp.proj_in.weight"] = torch.cat([gate_half, gelu_half])  # musefast: value · gelu(second)
        out[f"{dst}.mlp.inner_norm.weight"] = take(f"{ff}.3.gamma")
        out[f"{dst}.mlp.inner_norm.bias"] = take(f"{ff}.3.beta")
        out[f"{dst}.mlp.proj_out.weight"] = take(f"{ff}.4.weight")
    ignored = {k for k in state if k.startswith(_UNUSED_PREFIXES)}
    check_keys("muse-maskgit-pytorch transformer", state, used=used, ignored=ignored)
    return out


def convert_transformer(source: Any, *, grid_size: int | None = None, backend: str | None = None,
                        **lucidrains_kwargs) -> MuseTransformer:
    """A muse-maskgit-pytorch ``MaskGitTransformer`` / ``MaskGit`` (or its state dict) -> a
    musefast :class:`MuseTransformer` with the same logits.

    Args:
        source: the module or its ``state_dict()``.
        grid_size: tokens per side (default: sqrt of the checkpoint's ``seq_len``).
        backend: attention backend of the musefast model.
        **lucidrains_kwargs: the peer's constructor kwargs (``num_tokens``, ``dim``, ``depth``,
            ``heads``, ``dim_head``, ``ff_mult``, ``seq_len``, ``self_cond``), checked
            against the weights.
    """
    state, attrs = _state_of(source)
    cfg = _infer_config(state, attrs, lucidrains_kwargs, grid_size, backend)
    model = MuseTransformer(cfg)
    load_strict(model, _convert_state(state, cfg), source="muse-maskgit-pytorch transformer -> MuseTransformer")
    return model.eval()


def convert_superres_transformer(source: Any, *, low_grid_size: int, grid_size: int | None = None,
                                 backend: str | None = None, **lucidrains_kwargs) -> SuperResTransformer:
    """The transformer of a super-res ``MaskGit`` (conditioned on low-res token ids) -> a musefast
    :class:`SuperResTransformer` with the same logits.

    ``low_grid_size``: low-res tokens per side (``cond_vae.get_encoded_fmap_size(cond_image_size)``).
    The low-res ids must come from a tokenizer with the same codebook size as the high-res one
    (muse-maskgit-pytorch asserts it: both index one embedding table).
    """
    base = convert_transformer(source, grid_size=grid_size, backend=backend, **lucidrains_kwargs)
    high = base.config
    cfg = SuperResConfig(high=high, low_codebook_size=high.codebook_size, low_grid_size=low_grid_size,
                         encoder_depth=0, low_norm=False)
    model = SuperResTransformer(cfg)
    state = {f"transformer.{k}": v for k, v in base.state_dict().items()}
    state["low_embed.weight"] = base.token_embed.weight.detach()[: high.codebook_size]
    state["low_pos_embed"] = torch.zeros(1, low_grid_size**2, high.dim, dtype=base.pos_embed.dtype)
    load_strict(model, state, source="muse-maskgit-pytorch super-res transformer -> SuperResTransformer")
    return model.eval()


def convert_maskgit(maskgit: nn.Module, *, backend: str | None = None) -> MuseTransformer | SuperResTransformer:
    """A muse-maskgit-pytorch ``MaskGit`` object -> :class:`MuseTransformer` (base) or, when it is
    conditioned on low-res images (``cond_image_size`` set), :class:`SuperResTransformer`.
    Its VAE converts separately with :func:`convert_vae`."""
    vae = getattr(maskgit, "vae", None)
    grid = vae.get_encoded_fmap_size(maskgit.image_size) if vae is not None else None
    if getattr(maskgit, "resize_image_for_cond_image", False):
        low = maskgit.cond_vae.get_encoded_fmap_size(maskgit.cond_image_size)
        return convert_superres_transformer(maskgit, low_grid_size=low, grid_size=grid, backend=backend)
    return convert_transformer(maskgit, grid_size=grid, backend=backend)


def convert_vae(source: Any, **vae_kwargs):
    """A muse-maskgit-pytorch ``VQGanVAE`` with lookup-free quantization (or its state dict plus
    its constructor kwargs) -> :class:`musefast.models.lfq_vae.LFQVAE` with the same tokens."""
    from musefast.models.lfq_vae import from_lucidrains_vae

    return from_lucidrains_vae(source, **vae_kwargs)
