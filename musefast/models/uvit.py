"""aMUSEd's U-ViT (``UVit2D``): the masked transformer of ``amused/amused-256`` and ``-512``.

Structure (diffusers' ``UVit2DModel``; arXiv 2401.01808)::

    tokens (B, h, w) -> embedding -> RMSNorm -> 1x1 conv                    (``embed``)
    down_block: [2x2 stride-2 conv] + num_res_blocks x (ConvNeXt block, text attention block)
    RMSNorm -> Linear to hidden_size -> num_hidden_layers x transformer layer -> RMSNorm -> Linear
    up_block: num_res_blocks x (ConvNeXt block, text attention block) + [2x2 transposed conv]
    mlm_layer: 1x1 conv -> RMSNorm -> 1x1 conv to codebook_size logits

* conditioning: ``cond = MLP([pooled CLIP embedding; sinusoidal(micro_conds)])``, micro_conds =
  (width, height, crop x, crop y, aesthetic score); it modulates every ConvNeXt block and every
  AdaLN-continuous norm of the transformer layers (x · (1 + scale) + shift);
* text: CLIP's penultimate hidden states, projected and RMS-normed; the transformer layers
  cross-attend to them, and *both* sub-attentions of each U-ViT attention block attend to them
  (through a SiLU + Linear ``kv_mapper`` when widths differ) — there is no self-attention there;
* transformer layer: x += SelfAttn(AdaRMSNorm(x)); x += CrossAttn(AdaRMSNorm(x), text);
  x += GEGLU-FFN(AdaLayerNorm(x)).

Everything that depends only on the text and the conditioning — the K/V of all 2·2·num_res_blocks
+ num_hidden_layers text attentions and the scale/shift of every modulated norm — is constant over
the decoding steps: :meth:`UVit2D.prepare_context` computes it once per generation and
``forward(tokens, context=...)`` reuses it. Feature maps stay channels-last (B, h, w, C)
throughout, so 1x1 convolutions are Linear layers.

Parameter names follow diffusers' (``transformer_layers.3.norm1.linear.weight``...), except
that q/k/v projections are fused (``to_qkv``, ``to_kv``), ``to_out.0`` is ``to_out``, the
feed-forward is ``ff.proj_in``/``ff.proj_out`` and 1x1 conv weights are stored 2-D: a diffusers
``transformer/`` folder loads with :meth:`UVit2D.from_pretrained` (converted on the fly).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from musefast.compat.amused_weights import is_diffusers_folder, load_converted, read_diffusers_config
from musefast.cpu import linear as cpu_linear
from musefast.models.serialization import config_from_dict, load_component, read_config, register_component
from musefast.nn.attention import Attention, CrossAttention, CrossAttentionKV
from musefast.nn.feedforward import FeedForward
from musefast.nn.row_cache import gather_rows, rows_from_mask, scatter_rows_
from musefast.ops.rms_norm import rms_norm_modulate

DIFFUSERS_CLASS = "UVit2DModel"


@dataclass(frozen=True)
class UVit2DConfig:
    """Architecture of :class:`UVit2D`. Field names and defaults are diffusers' ``UVit2DModel``
    config (so its ``config.json`` maps one to one); the defaults are amused-256's.

    ``vocab_size`` counts the codebook, the [MASK] id and padding (aMUSEd: 8256, mask id 8255);
    ``micro_cond_embed_dim`` = number of micro-conditions × ``micro_cond_encode_dim``;
    ``sample_size`` is the token grid side (16 for amused-256, 32 for amused-512).
    ``hidden_dropout`` / ``attention_dropout`` are kept for the config round trip (inference
    only). ``backend``: attention backend (None = best available); not a diffusers field.
    """

    hidden_size: int = 1024
    use_bias: bool = False
    hidden_dropout: float = 0.0
    cond_embed_dim: int = 768
    micro_cond_encode_dim: int = 256
    micro_cond_embed_dim: int = 1280
    encoder_hidden_size: int = 768
    vocab_size: int = 8256
    codebook_size: int = 8192
    in_channels: int = 768
    block_out_channels: int = 768
    num_res_blocks: int = 3
    downsample: bool = False
    upsample: bool = False
    block_num_heads: int = 12
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    attention_dropout: float = 0.0
    intermediate_size: int = 2816
    layer_norm_eps: float = 1e-6
    ln_elementwise_affine: bool = True
    sample_size: int = 64
    backend: str | None = None

    def __post_init__(self):
        for name in ("hidden_size", "cond_embed_dim", "micro_cond_encode_dim", "micro_cond_embed_dim",
                     "encoder_hidden_size", "vocab_size", "codebook_size", "in_channels", "block_out_channels",
                     "block_num_heads", "num_attention_heads", "intermediate_size", "sample_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"UVit2DConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0 or self.num_hidden_layers < 0:
            raise ValueError("UVit2DConfig.num_res_blocks and num_hidden_layers must be >= 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.block_out_channels % self.block_num_heads:
            raise ValueError(f"block_out_channels ({self.block_out_channels}) must be divisible by block_num_heads "
                             f"({self.block_num_heads})")
        if self.micro_cond_embed_dim % self.micro_cond_encode_dim:
            raise ValueError(f"micro_cond_embed_dim ({self.micro_cond_embed_dim}) must be a multiple of "
                             f"micro_cond_encode_dim ({self.micro_cond_encode_dim})")
        # diffusers accepts vocab_size == codebook_size (its tiny test models do): the [MASK] id is
        # then the last codebook entry, which the sampler may also draw, as diffusers' does
        if self.codebook_size > self.vocab_size:
            raise ValueError(f"vocab_size ({self.vocab_size}) must be at least codebook_size ({self.codebook_size}): "
                             "every codebook id needs an embedding")

    @property
    def num_micro_conds(self) -> int:
        return self.micro_cond_embed_dim // self.micro_cond_encode_dim

    @property
    def mask_token_id(self) -> int:
        """aMUSEd's convention: the last id of the vocabulary (8255)."""
        return self.vocab_size - 1


def _rms_norm(dim: int, cfg: UVit2DConfig) -> nn.RMSNorm:
    return nn.RMSNorm(dim, eps=cfg.layer_norm_eps, elementwise_affine=cfg.ln_elementwise_affine)


def _rms(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` through the ``rms_norm_modulate`` op (one C++ pass on CPUs, where it applies)."""
    weight = None if norm.weight is None else norm.weight[None]
    return rms_norm_modulate(x, norm.eps, weight)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) -> a (B, C, h, w) view (channels-last memory) for convolutions."""
    return x.permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(n,) values -> (n, dim) float32 [cos(v·f_i), sin(v·f_i)], f_i = max_period^(−i / (dim // 2))
    (diffusers' get_timestep_embedding with flip_sin_to_cos=True, downscale_freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class Modulation(NamedTuple):
    """x · scale1p + shift, both (B, C) (scale1p = 1 + scale), precomputed per generation."""

    scale1p: torch.Tensor
    shift: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, ..., C): broadcast over the middle dimensions. One fused pass (addcmul), not a
        product and a sum."""
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return torch.addcmul(self.shift.view(shape), x, self.scale1p.view(shape))


def _modulation(linear: nn.Linear, cond: torch.Tensor) -> Modulation:
    scale, shift = linear(F.silu(cond)).chunk(2, dim=1)
    return Modulation(1 + scale, shift)


class AdaNorm(nn.Module):
    """AdaLN-continuous: norm(x) · (1 + scale) + shift, (scale, shift) = linear(SiLU(cond))."""

    def __init__(self, dim: int, cfg: UVit2DConfig, kind: str):
        super().__init__()
        self.linear = nn.Linear(cfg.hidden_size, 2 * dim, bias=cfg.use_bias)
        if kind == "rmsnorm":
            self.norm = _rms_norm(dim, cfg)
        else:
            self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps, elementwise_affine=cfg.ln_elementwise_affine,
                                     bias=cfg.use_bias)

    def modulation(self, cond: torch.Tensor) -> Modulation:
        """The modulation with the norm's own affine folded in, once per generation:
        (n·w + b)·(1 + s) + t = n·(w·(1 + s)) + (b·(1 + s) + t), so :meth:`forward` makes one
        pass after the bare normalisation instead of three."""
        mod = _modulation(self.linear, cond)
        weight, bias = self.norm.weight, getattr(self.norm, "bias", None)
        shift = mod.shift if bias is None else torch.addcmul(mod.shift, bias, mod.scale1p)
        return Modulation(mod.scale1p if weight is None else mod.scale1p * weight, shift)

    def forward(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        """norm(x) · (1 + scale) + shift; ``mod`` from :meth:`modulation` (the norm's affine in it)."""
        norm = self.norm
        if isinstance(norm, nn.RMSNorm):  # one C++ pass on CPUs (ops.rms_norm_modulate)
            return rms_norm_modulate(x, norm.eps, mod.scale1p, mod.shift)
        return mod.apply(F.layer_norm(x, norm.normalized_shape, None, None, norm.eps))


class TokenEmbedding(nn.Module):
    """tokens (B, h, w) -> (B, h, w, block_out_channels): embedding, RMSNorm, 1x1 conv."""

    def __init__(self, cfg: UVit2DConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.in_channels)
        self.layer_norm = _rms_norm(cfg.in_channels, cfg)
        self.conv = nn.Linear(cfg.in_channels, cfg.block_out_channels, bias=cfg.use_bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer_norm(self.embeddings(tokens)))


class CondEmbedding(nn.Module):
    """[pooled text; micro-condition features] -> conditioning vector: Linear, SiLU, Linear."""

    def __init__(self, cfg: UVit2DConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.cond_embed_dim + cfg.micro_cond_embed_dim, cfg.hidden_size, bias=cfg.use_bias)
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN over (B, h, w, C): x + gamma · (x · n) + beta, n = ‖x‖_hw / mean_C ‖x‖_hw."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the spatial norm is accumulated in float32: a half-precision sum of squares overflows
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True, dtype=torch.float32)
        nx = (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        # gamma·(x·n) + beta + x = x·(1 + gamma·n) + beta: one pass over the wide activation
        return torch.addcmul(self.beta, x, torch.addcmul(torch.ones_like(self.gamma), self.gamma, nx))


class ConvNextBlock(nn.Module):
    """Depthwise 3x3 conv -> RMSNorm -> Linear(4C) -> GELU -> GRN -> Linear(C), residual, then
    the conditioning's modulation x · (1 + scale) + shift."""

    def __init__(self, cfg: UVit2DConfig, ffn_factor: int = 4):
        super().__init__()
        c = cfg.block_out_channels
        self.depthwise = nn.Conv2d(c, c, kernel_size=3, padding=1, groups=c, bias=cfg.use_bias)
        self.norm = _rms_norm(c, cfg)
        self.channelwise_linear_1 = nn.Linear(c, c * ffn_factor, bias=cfg.use_bias)
        self.channelwise_norm = GlobalResponseNorm(c * ffn_factor)
        self.channelwise_linear_2 = nn.Linear(c * ffn_factor, c, bias=cfg.use_bias)
        self.cond_embeds_mapper = nn.Linear(cfg.hidden_size, 2 * c, bias=cfg.use_bias)

    def modulation(self, cond: torch.Tensor) -> Modulation:
        return _modulation(self.cond_embeds_mapper, cond)

    def forward(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        h = _nhwc(self.depthwise(_nchw(x)))
        h = self.channelwise_linear_1(self.norm(h))
        h = self.channelwise_linear_2(self.channelwise_norm(F.gelu(h)))
        return mod.apply(x + h)


@cpu_linear.fused_forward(ConvNextBlock)
def _convnext_cpu_forward(module: ConvNextBlock, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
    """The ConvNeXt block on the CPU path: the GELU in the epilogue of its first channel-wise linear,
    the residual in the epilogue of its second."""
    lin1 = module.channelwise_linear_1
    if not cpu_linear.runs_packed(lin1, x):
        return type(module).forward(module, x, mod)
    h = _nhwc(module.depthwise(_nchw(x)))
    h = cpu_linear.linear(lin1, module.norm(h), "gelu")
    return mod.apply(cpu_linear.linear_add(module.channelwise_linear_2, module.channelwise_norm(h), x))


class TextAttentionBlock(nn.Module):
    """x += CrossAttn₁(RMSNorm(x), text); x += CrossAttn₂(RMSNorm(x), text) — both attend to the
    text (diffusers' SkipFFTransformerBlock), seen through SiLU + Linear when widths differ."""

    def __init__(self, cfg: UVit2DConfig):
        super().__init__()
        c = cfg.block_out_channels
        self.kv_mapper = nn.Linear(cfg.hidden_size, c, bias=cfg.use_bias) if cfg.hidden_size != c else None
        kw = dict(head_dim=c // cfg.block_num_heads, bias=cfg.use_bias, backend=cfg.backend)
        self.norm1 = nn.RMSNorm(c, eps=1e-6)
        self.attn1 = CrossAttention(c, cfg.block_num_heads, **kw)
        self.norm2 = nn.RMSNorm(c, eps=1e-6)
        self.attn2 = CrossAttention(c, cfg.block_num_heads, **kw)

    def precompute_kv(self, text: torch.Tensor) -> tuple[CrossAttentionKV, CrossAttentionKV]:
        if self.kv_mapper is not None:
            text = self.kv_mapper(F.silu(text))
        return self.attn1.precompute_kv(text), self.attn2.precompute_kv(text)

    def forward(self, x: torch.Tensor, kv: tuple[CrossAttentionKV, CrossAttentionKV]) -> torch.Tensor:
        x = x + self.attn1(_rms(self.norm1, x), kv=kv[0])
        return x + self.attn2(_rms(self.norm2, x), kv=kv[1])


class Downsample(nn.Module):
    """RMSNorm, then a 2x2 stride-2 conv (after right/bottom zero padding, as diffusers)."""

    def __init__(self, cfg: UVit2DConfig):
        super().__init__()
        c = cfg.block_out_channels
        self.norm = _rms_norm(c, cfg)
        self.conv = nn.Conv2d(c, c, kernel_size=2, stride=2, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _nchw(self.norm(x))
        if x.shape[2] % 2 or x.shape[3] % 2:  # the padding only matters for odd sizes
            x = F.pad(x, (0, 1, 0, 1))
        return _nhwc(self.conv(x))


class Upsample(nn.Module):
    """RMSNorm, then a 2x2 stride-2 transposed conv."""

    def __init__(self, cfg: UVit2DConfig):
        super().__init__()
        c = cfg.block_out_channels
        self.norm = _rms_norm(c, cfg)
        self.conv = nn.ConvTranspose2d(c, c, kernel_size=2, stride=2, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _nhwc(self.conv(_nchw(self.norm(x))))


class UVitBlock(nn.Module):
    """[Downsample] -> num_res_blocks x (ConvNeXt block, text attention block) -> [Upsample]."""

    def __init__(self, cfg: UVit2DConfig, *, downsample: bool, upsample: bool):
        super().__init__()
        self.downsample = Downsample(cfg) if downsample else None
        self.res_blocks = nn.ModuleList(ConvNextBlock(cfg) for _ in range(cfg.num_res_blocks))
        self.attention_blocks = nn.ModuleList(TextAttentionBlock(cfg) for _ in range(cfg.num_res_blocks))
        self.upsample = Upsample(cfg) if upsample else None

    def prepare(self, cond: torch.Tensor, text: torch.Tensor) -> list:
        return [(res.modulation(cond), attn.precompute_kv(text))
                for res, attn in zip(self.res_blocks, self.attention_blocks)]

    def forward(self, x: torch.Tensor, prepared: list) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        B, h, w, C = x.shape
        for res, attn, (mod, kv) in zip(self.res_blocks, self.attention_blocks, prepared):
            x = res(x, mod)
            x = attn(x.reshape(B, h * w, C), kv).view(B, h, w, C)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class TransformerLayer(nn.Module):
    """x += SelfAttn(AdaRMSNorm(x)); x += CrossAttn(AdaRMSNorm(x), text); x += GEGLU(AdaLayerNorm(x))."""

    def __init__(self, cfg: UVit2DConfig):
        super().__init__()
        d = cfg.hidden_size
        kw = dict(head_dim=d // cfg.num_attention_heads, bias=cfg.use_bias, backend=cfg.backend)
        self.norm1 = AdaNorm(d, cfg, "rmsnorm")
        self.attn1 = Attention(d, cfg.num_attention_heads, **kw)
        self.norm2 = AdaNorm(d, cfg, "rmsnorm")
        self.attn2 = CrossAttention(d, cfg.num_attention_heads, **kw)
        self.norm3 = AdaNorm(d, cfg, "layernorm")
        self.ff = FeedForward(d, cfg.intermediate_size, "geglu", bias=cfg.use_bias)

    def prepare(self, cond: torch.Tensor, text: torch.Tensor):
        mods = (self.norm1.modulation(cond), self.norm2.modulation(cond), self.norm3.modulation(cond))
        return mods, self.attn2.precompute_kv(text)

    def forward(self, x: torch.Tensor, prepared, *, kv_store=None, rows: torch.Tensor | None = None) -> torch.Tensor:
        (m1, m2, m3), kv = prepared
        x = x + self.attn1(self.norm1(x, m1), kv_store=kv_store, rows=rows)
        x = x + self.attn2(self.norm2(x, m2), kv=kv)
        return self.ff(self.norm3(x, m3), residual=x)


class MlmHead(nn.Module):
    """1x1 conv -> RMSNorm -> 1x1 conv to the codebook logits (channels-last: Linear layers)."""

    def __init__(self, cfg: UVit2DConfig):
        super().__init__()
        self.conv1 = nn.Linear(cfg.block_out_channels, cfg.in_channels, bias=cfg.use_bias)
        self.layer_norm = _rms_norm(cfg.in_channels, cfg)
        self.conv2 = nn.Linear(cfg.in_channels, cfg.codebook_size, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.layer_norm(self.conv1(x)))


class UVitContext(NamedTuple):
    """Everything :class:`UVit2D` derives from the text and conditioning, for a batch of B:
    per-block modulations and text K/V (``down``, ``layers``, ``up``)."""

    down: list
    layers: list
    up: list

    @property
    def batch_size(self) -> int:
        return self.layers[0][1].k.shape[0] if self.layers else self.down[0][1][0].k.shape[0]


@register_component
class UVit2D(nn.Module):
    """aMUSEd's masked U-ViT. tokens (B, h, w) int64 (the [MASK] id is ``vocab_size − 1``) ->
    logits (B, h, w, codebook_size) in the model dtype.

    Conditioning (per image): ``encoder_hidden_states`` (B, L, encoder_hidden_size) — CLIP's
    penultimate hidden states; ``pooled_text_emb`` (B, cond_embed_dim) — CLIP's projected
    text embedding; ``micro_conds`` (B, 5) or (5,) — (width, height, crop x, crop y, aesthetic
    score). Pass them to :meth:`prepare_context` once and ``context=`` at every step.
    """

    config_class = UVit2DConfig

    def __init__(self, config: UVit2DConfig | None = None):
        super().__init__()
        self.config = cfg = config or UVit2DConfig()
        self.encoder_proj = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size, bias=cfg.use_bias)
        self.encoder_proj_layer_norm = _rms_norm(cfg.hidden_size, cfg)
        self.embed = TokenEmbedding(cfg)
        self.cond_embed = CondEmbedding(cfg)
        self.down_block = UVitBlock(cfg, downsample=cfg.downsample, upsample=False)
        self.project_to_hidden_norm = _rms_norm(cfg.block_out_channels, cfg)
        self.project_to_hidden = nn.Linear(cfg.block_out_channels, cfg.hidden_size, bias=cfg.use_bias)
        self.transformer_layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.project_from_hidden_norm = _rms_norm(cfg.hidden_size, cfg)
        self.project_from_hidden = nn.Linear(cfg.hidden_size, cfg.block_out_channels, bias=cfg.use_bias)
        self.up_block = UVitBlock(cfg, downsample=False, upsample=cfg.upsample)
        self.mlm_layer = MlmHead(cfg)

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder_proj.weight.device

    # -- conditioning ------------------------------------------------------------------------

    def embed_conditioning(self, pooled_text_emb: torch.Tensor, micro_conds: torch.Tensor) -> torch.Tensor:
        """(B, cond_embed_dim), (B, 5) or (5,) -> the conditioning vector (B, hidden_size)."""
        cfg = self.config
        B = pooled_text_emb.shape[0]
        if pooled_text_emb.dim() != 2 or pooled_text_emb.shape[1] != cfg.cond_embed_dim:
            raise ValueError(f"pooled_text_emb must be (B, {cfg.cond_embed_dim}), got {tuple(pooled_text_emb.shape)}")
        micro = torch.as_tensor(micro_conds, device=pooled_text_emb.device)
        if micro.dim() == 1:
            micro = micro.expand(B, -1)
        if micro.shape != (B, cfg.num_micro_conds):
            raise ValueError(f"micro_conds must be ({cfg.num_micro_conds},) or (B={B}, {cfg.num_micro_conds}), "
                             f"got {tuple(micro.shape)}")
        features = sinusoidal_embedding(micro.reshape(-1), cfg.micro_cond_encode_dim).reshape(B, -1)
        x = torch.cat([pooled_text_emb.float(), features], dim=1).to(self.dtype)
        return self.cond_embed(x)

    @torch.no_grad()
    def prepare_context(self, encoder_hidden_states: torch.Tensor, pooled_text_emb: torch.Tensor,
                        micro_conds: torch.Tensor) -> UVitContext:
        """Compute once per generation what every step reuses (see :class:`UVitContext`)."""
        cfg = self.config
        ehs = encoder_hidden_states
        if ehs.dim() != 3 or ehs.shape[2] != cfg.encoder_hidden_size:
            raise ValueError(f"encoder_hidden_states must be (B, L, {cfg.encoder_hidden_size}), got {tuple(ehs.shape)}")
        if ehs.shape[0] != pooled_text_emb.shape[0]:
            raise ValueError(f"encoder_hidden_states (B={ehs.shape[0]}) and pooled_text_emb "
                             f"(B={pooled_text_emb.shape[0]}) must have the same batch size")
        text = self.encoder_proj_layer_norm(self.encoder_proj(ehs.to(self.dtype)))
        cond = self.embed_conditioning(pooled_text_emb, micro_conds)
        return UVitContext(self.down_block.prepare(cond, text),
                           [layer.prepare(cond, text) for layer in self.transformer_layers],
                           self.up_block.prepare(cond, text))

    # -- forward -----------------------------------------------------------------------------

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 3:
            raise TypeError(f"tokens must be an int64 tensor (B, h, w), got "
                            f"{tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__}"
                            f"{'' if not isinstance(tokens, torch.Tensor) else ' of shape ' + str(tuple(tokens.shape))}")
        if self.config.downsample and (tokens.shape[1] % 2 or tokens.shape[2] % 2):
            raise ValueError(f"this model downsamples 2x: the token grid must be even, got {tuple(tokens.shape[1:])}")

    def forward(
        self,
        tokens: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_text_emb: torch.Tensor | None = None,
        micro_conds: torch.Tensor | None = None,
        *,
        context: UVitContext | None = None,
        kv_store=None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, h, w) and either the conditioning or a prepared ``context`` -> logits
        (B, h, w, codebook_size).

        Step cache (musefast.nn.row_cache): with ``kv_store`` and ``rows=None`` the transformer
        layers record their self-attention K/V and the stack's output; with ``rows`` (B, M)
        token positions, the transformer layers run only on those rows (on a downsampling
        model: the cells holding them) against the recorded K/V, the convolutional blocks
        run on the whole grid (their depthwise convolutions and response norms mix positions),
        and the logits of the rows come back as (B, M, codebook_size).
        """
        self._check_tokens(tokens)
        if context is None:
            if encoder_hidden_states is None or pooled_text_emb is None or micro_conds is None:
                raise ValueError("pass encoder_hidden_states, pooled_text_emb and micro_conds, or a prepared context")
            context = self.prepare_context(encoder_hidden_states, pooled_text_emb, micro_conds)
        if context.batch_size != tokens.shape[0]:
            raise ValueError(f"context was prepared for batch {context.batch_size}, tokens have batch {tokens.shape[0]}")
        x = self.down_block(self.embed(tokens), context.down)
        B, h, w, C = x.shape
        x = x.reshape(B, h * w, C)
        inner_rows = None if rows is None else self._inner_rows(rows, tokens.shape[1:], (h, w))
        if inner_rows is not None:
            x = gather_rows(x, inner_rows)
        x = self.project_to_hidden(self.project_to_hidden_norm(x))
        for layer, prepared in zip(self.transformer_layers, context.layers):
            x = layer(x, prepared, kv_store=kv_store, rows=inner_rows)
        x = self.project_from_hidden(self.project_from_hidden_norm(x))
        if kv_store is not None:
            if inner_rows is None:
                kv_store.put(self, "hidden", x)  # the up block reads every position
            else:
                x = scatter_rows_(kv_store.get(self, "hidden"), inner_rows, x)
        x = self.up_block(x.view(B, h, w, C), context.up)
        if rows is None:
            return self.mlm_layer(x)
        return self.mlm_layer(gather_rows(x.reshape(B, -1, C), rows))

    @staticmethod
    def _inner_rows(rows: torch.Tensor, grid: tuple, inner: tuple) -> torch.Tensor:
        """Token rows (B, M) -> rows of the transformer's grid (the 2x2 cells holding them)."""
        if tuple(grid) == tuple(inner):
            return rows
        B = rows.shape[0]
        selected = torch.zeros(B, grid[0] * grid[1], dtype=torch.bool, device=rows.device).scatter_(1, rows, True)
        selected = F.max_pool2d(selected.view(B, 1, *grid).float(), 2, ceil_mode=True)[:, 0] > 0
        return rows_from_mask(selected.reshape(B, -1))

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, variant: str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        backend: str | None = None) -> "UVit2D":
        """Load a musefast component folder or a diffusers ``UVit2DModel`` folder (config.json +
        diffusion_pytorch_model[.variant].safetensors, e.g. ``amused-256/transformer``).

        Args:
            variant: diffusers weight variant (``"fp16"``); default: the full-precision file,
                else the only variant present.
            device, dtype: where to put the model and its dtype (default: CPU; the file's dtype
                for diffusers folders, float32 for musefast folders).
            backend: attention backend of every attention layer (None = best available).
        """
        if is_diffusers_folder(folder):
            return cls.from_diffusers(folder, variant=variant, device=device, dtype=dtype, backend=backend)
        read_config(folder)  # a clear error when the folder is in neither format
        model = load_component(folder, cls, device=device, dtype=dtype)
        return model if backend is None else model.set_backend(backend)

    @classmethod
    def from_diffusers(cls, folder: str | os.PathLike, *, variant: str | None = None,
                       device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                       backend: str | None = None) -> "UVit2D":
        """Load a diffusers ``UVit2DModel`` folder, converting its weights (strict: any missing,
        unused or mis-shaped key is an error naming the file)."""
        data = read_diffusers_config(folder, DIFFUSERS_CLASS)
        config = config_from_dict(UVit2DConfig, data, source=str(Path(folder) / "config.json"))
        config = replace(config, backend=backend)
        return load_converted(lambda: cls(config), folder, diffusers_source_keys, variant=variant,
                              device=device, dtype=dtype)

    def enable_layerwise_casting(self, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                                 compute_dtype: torch.dtype | None = None, **kwargs) -> None:
        """diffusers' ``ModelMixin.enable_layerwise_casting``, accepted so diffusers code runs:
        the model is cast to ``compute_dtype`` and its weights stay there — musefast does not
        store weights in ``storage_dtype`` between layers (a warning says so)."""
        import warnings

        warnings.warn(f"musefast's UVit2D keeps its weights in the compute dtype ({compute_dtype or self.dtype}): "
                      f"layerwise casting to {storage_dtype} storage is not implemented", stacklevel=2)
        if compute_dtype is not None:
            self.to(dtype=compute_dtype)

    def set_backend(self, backend: str | None) -> "UVit2D":
        """Use attention backend ``backend`` (None = best available) in every attention layer."""
        for module in self.modules():
            if isinstance(module, (Attention, CrossAttention)):
                module.backend = backend
        self.config = replace(self.config, backend=backend)
        return self


def diffusers_source_keys(key: str) -> list[str]:
    """The diffusers ``UVit2DModel`` key(s) a :class:`UVit2D` parameter is made of (several are
    concatenated along dim 0: fused q/k/v and k/v projections)."""
    prefix, _, leaf = key.rpartition(".")
    module, _, last = prefix.rpartition(".")
    if last == "to_qkv":
        return [f"{module}.to_{p}.{leaf}" for p in "qkv"]
    if last == "to_kv":
        return [f"{module}.to_{p}.{leaf}" for p in "kv"]
    if last == "to_out":
        return [f"{prefix}.0.{leaf}"]
    if prefix.endswith(".ff.proj_in"):
        return [f"{module}.net.0.proj.{leaf}"]
    if prefix.endswith(".ff.proj_out"):
        return [f"{module}.net.2.{leaf}"]
    return [key]


__all__ = ["UVit2D", "UVit2DConfig", "UVitContext", "diffusers_source_keys", "sinusoidal_embedding"]
