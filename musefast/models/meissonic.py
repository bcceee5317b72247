"""Meissonic's transformer (``MeissonicTransformer``): MeissonFlow/Meissonic and Monetico on musefast.

Structure (the peer's ``Transformer2DModel`` of viiika/Meissonic ``src/transformer.py``)::

    tokens (B, H, W) -> embedding -> RMSNorm -> 1x1 conv          (aMUSEd's token embedding)
    [RMSNorm + 2x2 stride-2 conv]                                  (``downsample``: 64x64 -> 32x32)
    RMSNorm -> Linear -> image stream x (B, N, d)
    text: Linear(joint_attention_dim -> d) -> RMSNorm -> text stream c (B, L, d)
    num_layers x double-stream block:  AdaLN-Zero on x and on c, one attention over [c; x],
                                       gated residuals, GELU-tanh MLPs (one per stream)
    num_single_layers x single-stream block on [c; x]: AdaLN-Zero, attention ∥ MLP, gated residual
    image rows -> RMSNorm -> Linear -> [RMSNorm + 2x2 transposed conv] -> 1x1 conv, RMSNorm,
    1x1 conv to codebook_size logits

* conditioning: temb = MLP(sinusoid(1000 · timestep)) + MLP(cond), cond = MLP([pooled CLIP
  embedding; sinusoid(micro_conds)]) (aMUSEd's micro-conditioning); every block modulates its
  LayerNorms with (shift, scale, gate) = Linear(SiLU(temb));
* attention: q/k RMSNorm per head, rotary embedding over (text, image) ids — (0, 0, 0) for text,
  (0, row, col) for the transformer's image grid — with ``axes_dims_rope`` channels per axis.
  Text padding is attended, as in the peer (it passes no mask).

musefast's execution: fused q/k/v projections (single-stream blocks also fuse the MLP's input
projection into the same matmul), ``ops.qk_norm_rope`` (q/k RMSNorm + RoPE on half-width tables,
cached per grid, in one pass that writes q, k, v of both streams straight into the joint layout;
text ids are zero, so their rotation is an exact identity), ``ops.attention`` over the joint
sequence, the text projection and pooled conditioning computed once per
generation (:meth:`prepare_context`), channels-last feature maps (1x1 convolutions are Linear layers). The aMUSEd parts (token
embedding, down/up-sampling, MLM head, conditioning MLP) are :mod:`musefast.models.uvit`'s.

Parameter names follow the peer's except the fused projections (``attn.to_qkv``,
``attn.add_qkv``, single blocks' ``to_qkv_mlp``), ``to_out.0`` -> ``to_out``, feed-forwards
``proj_in``/``proj_out`` and ``down_block.downsample`` / ``up_block.upsample`` -> ``downsample`` /
``upsample``: a peer ``transformer/`` folder loads with :meth:`MeissonicTransformer.from_pretrained`
(converted on the fly by :mod:`musefast.compat.meissonic`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from musefast.models.serialization import load_component, read_config, register_component
from musefast.models.uvit import (
    CondEmbedding,
    Downsample,
    MlmHead,
    TokenEmbedding,
    Upsample,
    UVit2D,
    UVit2DConfig,
    sinusoidal_embedding,
)
from musefast.nn.feedforward import FeedForward
from musefast.nn.row_cache import KVStore, gather_rows, scatter_head_rows_, scatter_rows_
from musefast.nn.rope import RopeTables
from musefast.ops.attention import attention
from musefast.ops.rope import qk_norm_rope

# constants of the peer's code (not config fields there)
NORM_EPS = 1e-6
MICRO_COND_ENCODE_DIM = 256
NUM_MICRO_CONDS = 5  # width, height, crop x, crop y, aesthetic score
TIMESTEP_DIM = 256
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class MeissonicConfig:
    """Architecture of :class:`MeissonicTransformer`: the peer's config fields, defaults of
    MeissonFlow/Meissonic (1024 wide: 8 heads x 128; 14 double + 28 single blocks).

    ``patch_size``, ``in_channels`` and ``guidance_embeds`` are kept for the config round trip:
    the peer never uses the first two, and musefast supports only ``guidance_embeds=False``
    (the released models). ``backend``: attention backend (None = best available), not a peer field.
    """

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 14
    num_single_layers: int = 28
    attention_head_dim: int = 128
    num_attention_heads: int = 8
    joint_attention_dim: int = 1024
    pooled_projection_dim: int = 1024
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    vocab_size: int = 8256
    codebook_size: int = 8192
    downsample: bool = True
    upsample: bool = True
    backend: str | None = None

    def __post_init__(self):
        for name in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                     "vocab_size", "codebook_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MeissonicConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 0 or self.num_single_layers < 0:
            raise ValueError("MeissonicConfig.num_layers and num_single_layers must be >= 0")
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True (a guidance-distilled embedding) is not supported")
        if self.pooled_projection_dim != self.inner_dim:
            # the peer feeds its conditioning MLP's output (inner_dim wide) to a projection built
            # for pooled_projection_dim inputs: only equal sizes run
            raise ValueError(f"pooled_projection_dim ({self.pooled_projection_dim}) must equal num_attention_heads x "
                             f"attention_head_dim ({self.inner_dim}), as in the peer's model")
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {tuple(self.axes_dims_rope)} must be even and sum to attention_head_dim "
                             f"({self.attention_head_dim})")
        if self.downsample != self.upsample:
            raise ValueError(f"downsample ({self.downsample}) and upsample ({self.upsample}) must agree: the logits "
                             "must come out on the token grid")
        if self.codebook_size >= self.vocab_size:
            raise ValueError(f"vocab_size ({self.vocab_size}) must exceed codebook_size ({self.codebook_size})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mask_token_id(self) -> int:
        """The last id of the vocabulary (8255), as aMUSEd."""
        return self.vocab_size - 1

    def uvit_parts(self) -> UVit2DConfig:
        """The aMUSEd-style parts (embedding, down/up-sampling, MLM head, conditioning MLP) as
        the UVit2D config they are built from: every width is inner_dim, no biases."""
        d = self.inner_dim
        return UVit2DConfig(hidden_size=d, use_bias=False, cond_embed_dim=self.pooled_projection_dim,
                            micro_cond_encode_dim=MICRO_COND_ENCODE_DIM,
                            micro_cond_embed_dim=NUM_MICRO_CONDS * MICRO_COND_ENCODE_DIM,
                            encoder_hidden_size=self.joint_attention_dim, vocab_size=self.vocab_size,
                            codebook_size=self.codebook_size, in_channels=d, block_out_channels=d,
                            num_res_blocks=0, downsample=self.downsample, upsample=self.upsample,
                            block_num_heads=self.num_attention_heads, num_hidden_layers=0,
                            num_attention_heads=self.num_attention_heads, layer_norm_eps=NORM_EPS)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: LayerNorm(x) · (1 + scale) + shift, (B, d) modulations over (B, L, d)."""
    return _layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """The peer clamps the residual streams to fp16's range after every block."""
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class _MLP2(nn.Module):
    """Linear -> SiLU -> Linear (diffusers' TimestepEmbedding / PixArt text projection)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbedding(nn.Module):
    """temb = MLP(sinusoid(t)) + MLP(cond): the text half is constant per generation."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = _MLP2(TIMESTEP_DIM, dim)
        self.text_embedder = _MLP2(pooled_dim, dim)


class AdaLNZero(nn.Module):
    """(shift, scale, gate, ...) = Linear(SiLU(temb)).chunk(n): ``n`` modulations of width d."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n, dim=1)


class _HeadNorms(nn.Module):
    """q/k RMSNorm per head (weight of size head_dim)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.norm_q = nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.norm_k = nn.RMSNorm(head_dim, eps=NORM_EPS)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B, L, H·D)."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


def _cached_kv(owner: nn.Module, kv_store: KVStore | None, rows: torch.Tensor | None, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step cache (musefast.nn.row_cache) at one attention: a full forward (``rows`` None)
    records the joint K/V; a cheap one writes its rows' K/V, (B, H, M, D) at joint positions
    ``rows`` (B, M), into the record and attends to all of it."""
    if rows is None:
        if kv_store is not None:  # contiguous copies: a view would keep the whole projection output alive
            kv_store.put(owner, "k", k.contiguous())
            kv_store.put(owner, "v", v.contiguous())
        return k, v
    if kv_store is None:
        raise ValueError("rows= needs the kv_store of a full forward")
    return (scatter_head_rows_(kv_store.get(owner, "k"), rows, k),
            scatter_head_rows_(kv_store.get(owner, "v"), rows, v))


def _qk_norm_rope(qkv, q_weight, k_weight, rope: RopeTables, heads: int):
    """ops.qk_norm_rope with the block's tables: one call for the shared (L, D/2) tables, one per
    image for a step-cache forward's (B, L, D/2) tables (each image computes its own rows)."""
    if rope.cos.dim() == 2:
        return qk_norm_rope(qkv, q_weight, k_weight, rope.cos, rope.sin, heads=heads, eps=NORM_EPS)
    images = []
    for b in range(rope.cos.shape[0]):
        part = [s[b:b + 1] for s in qkv] if isinstance(qkv, (list, tuple)) else qkv[b:b + 1]
        images.append(qk_norm_rope(part, q_weight, k_weight, rope.cos[b], rope.sin[b], heads=heads, eps=NORM_EPS))
    return tuple(torch.cat(parts, dim=0) for parts in zip(*images))


class JointAttention(_HeadNorms):
    """One attention over [text; image]: fused q/k/v per stream, q/k RMSNorm and RoPE (``rope``: the
    tables of the joint sequence), output projection per stream."""

    def __init__(self, cfg: MeissonicConfig):
        super().__init__(cfg.attention_head_dim)
        d = cfg.inner_dim
        self.heads, self.head_dim, self.backend = cfg.num_attention_heads, cfg.attention_head_dim, cfg.backend
        self.to_qkv = nn.Linear(d, 3 * d)
        self.add_qkv = nn.Linear(d, 3 * d)
        self.norm_added_q = nn.RMSNorm(self.head_dim, eps=NORM_EPS)
        self.norm_added_k = nn.RMSNorm(self.head_dim, eps=NORM_EPS)
        self.to_out = nn.Linear(d, d)
        self.to_add_out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RopeTables, *, kv_store: KVStore | None = None,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step cache: ``rows`` (B, L + M) are the joint positions of [c; x] when x holds only
        some image rows (``rope`` then holds their per-image tables; the other rows' K/V come
        from ``kv_store``)."""
        # q, k, v of [text; image] in one pass each, written into the joint layout (no concatenation)
        q, k, v = _qk_norm_rope([self.add_qkv(c), self.to_qkv(x)], [self.norm_added_q.weight, self.norm_q.weight],
                                [self.norm_added_k.weight, self.norm_k.weight], rope, self.heads)
        out = attention(q, *_cached_kv(self, kv_store, rows, k, v), backend=self.backend)
        L = c.shape[1]
        return self.to_out(_merge(out[:, :, L:])), self.to_add_out(_merge(out[:, :, :L]))


class DoubleStreamBlock(nn.Module):
    """Text and image streams with their own modulations and MLPs, one joint attention."""

    def __init__(self, cfg: MeissonicConfig):
        super().__init__()
        d = cfg.inner_dim
        self.norm1 = AdaLNZero(d, 6)
        self.norm1_context = AdaLNZero(d, 6)
        self.attn = JointAttention(cfg)
        self.ff = FeedForward(d, 4 * d, "gelu", gelu_approximate="tanh")
        self.ff_context = FeedForward(d, 4 * d, "gelu", gelu_approximate="tanh")

    def forward(self, x, c, temb, rope: RopeTables, *, kv_store: KVStore | None = None,
                rows: torch.Tensor | None = None):
        """Step cache: see :meth:`JointAttention.forward`."""
        shift, scale, gate, shift2, scale2, gate2 = self.norm1(temb)
        c_shift, c_scale, c_gate, c_shift2, c_scale2, c_gate2 = self.norm1_context(temb)
        attn_x, attn_c = self.attn(_modulate(x, shift, scale), _modulate(c, c_shift, c_scale), rope,
                                   kv_store=kv_store, rows=rows)
        x = x + gate[:, None] * attn_x
        x = x + gate2[:, None] * self.ff(_modulate(x, shift2, scale2))
        c = c + c_gate[:, None] * attn_c
        c = c + c_gate2[:, None] * self.ff_context(_modulate(c, c_shift2, c_scale2))
        return x, _clip_fp16(c)


class SingleStreamBlock(_HeadNorms):
    """On [text; image]: h += gate · Linear([Attention(n); GELU(Linear(n))]), n = AdaLN(h); the
    q/k/v and MLP input projections of n are one matmul."""

    def __init__(self, cfg: MeissonicConfig, mlp_ratio: float = 4.0):
        super().__init__(cfg.attention_head_dim)
        d = cfg.inner_dim
        self.heads, self.head_dim, self.backend = cfg.num_attention_heads, cfg.attention_head_dim, cfg.backend
        self.mlp_dim = int(d * mlp_ratio)
        self.norm = AdaLNZero(d, 3)
        self.to_qkv_mlp = nn.Linear(d, 3 * d + self.mlp_dim)
        self.proj_out = nn.Linear(d + self.mlp_dim, d)

    def forward(self, h, temb, rope: RopeTables, *, kv_store: KVStore | None = None,
                rows: torch.Tensor | None = None):
        """Step cache: with ``rows`` (B, M) joint positions, h holds only those rows (the text
        rows and some image rows); the other rows' K/V come from ``kv_store``."""
        shift, scale, gate = self.norm(temb)
        qkv, mlp = self.to_qkv_mlp(_modulate(h, shift, scale)).split([3 * h.shape[-1], self.mlp_dim], dim=-1)
        q, k, v = _qk_norm_rope(qkv, self.norm_q.weight, self.norm_k.weight, rope, self.heads)
        out = attention(q, *_cached_kv(self, kv_store, rows, k, v), backend=self.backend)
        h = h + gate[:, None] * self.proj_out(torch.cat([_merge(out), F.gelu(mlp, approximate="tanh")], dim=-1))
        return _clip_fp16(h)


class MeissonicContext(NamedTuple):
    """What :class:`MeissonicTransformer` derives once per generation, for a batch of B:
    ``text`` (B, L, d) projected text stream, ``cond`` (B, d) the pooled half of temb."""

    text: torch.Tensor
    cond: torch.Tensor


@register_component
class MeissonicTransformer(nn.Module):
    """Meissonic / Monetico masked transformer. tokens (B, H, W) int64 ([MASK] = vocab_size − 1)
    -> logits (B, codebook_size, H, W) in the model dtype (the peer's layout; a view of
    channels-last memory: ``.permute(0, 2, 3, 1)`` is free).

    Conditioning: ``encoder_hidden_states`` (B, L, joint_attention_dim) — CLIP's penultimate
    hidden states; ``pooled_text_emb`` (B, pooled_projection_dim) — CLIP's projected text
    embedding; ``micro_conds`` (B, 5) or (5,) — (width, height, crop x, crop y, aesthetic score);
    ``timestep`` — the scheduler's step value (T−1 ... 0), an int or a (1,) / (B,) tensor.
    """

    config_class = MeissonicConfig

    def __init__(self, config: MeissonicConfig | None = None):
        super().__init__()
        self.config = cfg = config or MeissonicConfig()
        d, parts = cfg.inner_dim, cfg.uvit_parts()
        self.time_text_embed = TimeTextEmbedding(d, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, d)
        self.encoder_proj_layer_norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.cond_embed = CondEmbedding(parts)
        self.embed = TokenEmbedding(parts)
        self.downsample = Downsample(parts) if cfg.downsample else None
        self.project_to_hidden_norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.project_to_hidden = nn.Linear(d, d, bias=False)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers))
        self.project_from_hidden_norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.project_from_hidden = nn.Linear(d, d, bias=False)
        self.upsample = Upsample(parts) if cfg.upsample else None
        self.mlm_layer = MlmHead(parts)
        self._rope_cache: tuple | None = None  # (text_len, grid, device) -> RopeTables of the last call

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.context_embedder.weight.device

    # -- conditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_context(self, encoder_hidden_states: torch.Tensor, pooled_text_emb: torch.Tensor,
                        micro_conds) -> MeissonicContext:
        """Compute once per generation what every step reuses (see :class:`MeissonicContext`)."""
        cfg = self.config
        ehs, pooled = encoder_hidden_states, pooled_text_emb
        if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3 or ehs.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be (B, L, {cfg.joint_attention_dim}), got "
                             f"{tuple(getattr(ehs, 'shape', ()))}")
        if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2 or pooled.shape != (ehs.shape[0],
                                                                                         cfg.pooled_projection_dim):
            raise ValueError(f"pooled_text_emb must be (B={ehs.shape[0]}, {cfg.pooled_projection_dim}), got "
                             f"{tuple(getattr(pooled, 'shape', ()))}")
        B = ehs.shape[0]
        micro = torch.as_tensor(micro_conds, device=pooled.device)
        if micro.dim() == 1:
            micro = micro.expand(B, -1)
        if micro.shape != (B, NUM_MICRO_CONDS):
            raise ValueError(f"micro_conds must be ({NUM_MICRO_CONDS},) or (B={B}, {NUM_MICRO_CONDS}), got "
                             f"{tuple(micro.shape)}")
        features = sinusoidal_embedding(micro.reshape(-1), MICRO_COND_ENCODE_DIM).reshape(B, -1)
        cond = self.cond_embed(torch.cat([pooled.float(), features], dim=1).to(self.dtype))
        text = self.encoder_proj_layer_norm(self.context_embedder(ehs.to(self.dtype)))
        return MeissonicContext(text, self.time_text_embed.text_embedder(cond))

    def time_embedding(self, timestep, context: MeissonicContext) -> torch.Tensor:
        """temb (B, d) of a step: the peer scales the step value by 1000 in the model dtype."""
        t = torch.as_tensor(timestep, device=self.device).reshape(-1)
        if t.shape[0] not in (1, context.cond.shape[0]):
            raise ValueError(f"timestep must be a scalar, (1,) or (B={context.cond.shape[0]},), got {tuple(t.shape)}")
        features = sinusoidal_embedding(t.to(self.dtype) * 1000, TIMESTEP_DIM).to(self.dtype)
        return self.time_text_embed.timestep_embedder(features) + context.cond

    def rope_tables(self, text_len: int, grid: tuple[int, int]) -> RopeTables:
        """Rotary tables of the joint sequence: ``text_len`` zero ids, then (0, row, col). The
        last ones are kept: every step of a generation asks for the same."""
        key = (text_len, tuple(grid), self.device)
        if self._rope_cache is not None and self._rope_cache[0] == key:
            return self._rope_cache[1]
        h, w = grid
        ids = torch.zeros(text_len + h * w, len(self.config.axes_dims_rope), device=self.device)
        ids[text_len:, 1] = torch.arange(h, device=self.device).repeat_interleave(w).float()
        ids[text_len:, 2] = torch.arange(w, device=self.device).repeat(h).float()
        tables = RopeTables(ids, self.config.axes_dims_rope, ROPE_THETA)
        self._rope_cache = (key, tables)
        return tables

    # -- forward -----------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                pooled_text_emb: torch.Tensor | None = None, micro_conds=None, timestep=None, *,
                context: MeissonicContext | None = None, kv_store: KVStore | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, H, W), the conditioning (or a prepared ``context``) and ``timestep`` ->
        logits (B, codebook_size, H, W).

        Step cache (musefast.nn.row_cache): with ``kv_store`` and ``rows=None`` every attention
        records its joint (text + image) K/V; with ``rows`` (B, M) token positions, the text
        stream and only the image rows of the transformer's grid holding them (on a downsampling
        model the 2x2 cells: the stride-2 conv and transposed conv mix nothing outside a cell) run
        through the blocks, at their own rotary positions, against the recorded K/V of the other
        image rows. The text is always recomputed: its stream attends to the image, so a record
        of it goes stale like any image row's, and with it recomputing every row is the exact
        forward. Returns the rows' logits (B, M, codebook_size).
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 3:
            raise TypeError(f"tokens must be an int64 tensor (B, H, W), got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        if self.config.downsample and (tokens.shape[1] % 2 or tokens.shape[2] % 2):
            raise ValueError(f"this model downsamples 2x: the token grid must be even, got {tuple(tokens.shape[1:])}")
        if timestep is None:
            raise ValueError("timestep is required (the scheduler's step value, T-1 ... 0)")
        if context is None:
            if encoder_hidden_states is None or pooled_text_emb is None or micro_conds is None:
                raise ValueError("pass encoder_hidden_states, pooled_text_emb and micro_conds, or a prepared context")
            context = self.prepare_context(encoder_hidden_states, pooled_text_emb, micro_conds)
        if context.text.shape[0] != tokens.shape[0]:
            raise ValueError(f"context was prepared for batch {context.text.shape[0]}, tokens have batch "
                             f"{tokens.shape[0]}")
        temb = self.time_embedding(timestep, context)
        x = self.embed(tokens)
        if self.downsample is not None:
            x = self.downsample(x)
        B, h, w, d = x.shape
        x = x.reshape(B, h * w, d)
        L = context.text.shape[1]
        rope = self.rope_tables(L, (h, w))
        if rows is not None:  # the text and the cells holding the rows, at their positions in the joint [text; image] sequence
            cells = UVit2D._inner_rows(rows, tokens.shape[1:], (h, w))
            joint_rows = torch.cat([torch.arange(L, device=cells.device).expand(B, L), cells + L], dim=1)
            x = gather_rows(x, cells)
            rope = rope.gather(joint_rows)
        else:
            cells = joint_rows = None
        x, c = self.project_to_hidden(self.project_to_hidden_norm(x)), context.text
        for block in self.transformer_blocks:
            x, c = block(x, c, temb, rope, kv_store=kv_store, rows=joint_rows)
        joint = torch.cat([c, x], dim=1)
        for block in self.single_transformer_blocks:
            joint = block(joint, temb, rope, kv_store=kv_store, rows=joint_rows)
        x = self.project_from_hidden(self.project_from_hidden_norm(joint[:, L:]))
        if rows is None:
            x = x.view(B, h, w, d)
            if self.upsample is not None:
                x = self.upsample(x)
            return self.mlm_layer(x).permute(0, 3, 1, 2)
        if self.upsample is None:  # the cells are the rows
            return self.mlm_layer(x)
        # cells not computed stay zero: each token reads only its own cell through the 2x2 stride-2 transposed conv
        x = self.upsample(scatter_rows_(x.new_zeros(B, h * w, d), cells, x).view(B, h, w, d))
        return self.mlm_layer(gather_rows(x.reshape(B, -1, d), rows))

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, variant: str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        backend: str | None = None) -> "MeissonicTransformer":
        """Load a peer ``transformer/`` folder (config.json + diffusion_pytorch_model[.variant]
        .safetensors, as the peer's ``save_pretrained`` writes it) or a musefast component folder.

        Args:
            variant: weight variant (``"fp16"``); default: the full-precision file, else the
                only variant present.
            device, dtype: where to put the model and its dtype (default: CPU, the file's dtype
                for peer folders, float32 for musefast folders).
            backend: attention backend (None = best available).
        """
        from musefast.compat import meissonic

        if meissonic.is_meissonic_transformer(folder):
            return meissonic.load_transformer(cls, folder, variant=variant, device=device, dtype=dtype,
                                              backend=backend)
        read_config(folder)  # a clear error when the folder is in neither format
        model = load_component(folder, cls, device=device, dtype=dtype)
        return model if backend is None else model.set_backend(backend)

    def set_backend(self, backend: str | None) -> "MeissonicTransformer":
        """Use attention backend ``backend`` (None = best available) in every block."""
        for module in self.modules():
            if isinstance(module, (JointAttention, SingleStreamBlock)):
                module.backend = backend
        self.config = replace(self.config, backend=backend)
        return self


__all__ = ["MeissonicConfig", "MeissonicContext", "MeissonicTransformer"]
