"""Muse masked transformers (Muse §2.3, §2.4; MaskGIT's class-conditional variant).

``MuseTransformer``: token embedding with a [MASK] id (= codebook_size), learned 2-D position
embedding, ``depth`` pre-norm blocks of self-attention, cross-attention to the projected
text, and an MLP; final norm; a head over the codebook (the [MASK] id is never predicted).
Class-conditional mode (``num_classes`` set, ``text_dim`` None): a class token is prepended
to the sequence instead of cross-attention (id ``num_classes`` is the null class for CFG).
Optional config fields reproduce other ports (defaults keep the layout above): l2 q/k norm,
null K/V, MLP inner norm (lucidrains); NormFormer post-attention norms, a LayerNorm before the
MLP in rmsnorm models, projected+normed or unprojected text, no final norm and a BERT-style
MLM head (open-muse's MaskGitTransformer); BERT's post-norm residuals, a norm over the input
embeddings and the tanh GELU (google maskgit).

``SuperResTransformer``: the low-res tokens pass through a transformer encoder; its output,
concatenated with the projected text, is the cross-attention memory of a high-res
``MuseTransformer``.

The cross-attention memory is constant over all decoding steps: ``prepare_context`` projects
it to per-layer K/V once per generation, and ``forward(..., context=...)`` reuses them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from musefast.nn.attention import Attention, CrossAttention, CrossAttentionKV
from musefast.nn.feedforward import FeedForward, make_norm
from musefast.models.serialization import register_component


TEXT_PROJ_KINDS = ("linear", "linear_norm", "none")


@dataclass
class MuseTransformerConfig:
    codebook_size: int = 8192
    grid_size: int = 16  # tokens per side: the sequence is grid_size² image tokens
    dim: int = 512
    depth: int = 8
    num_heads: int = 8
    head_dim: int | None = None
    text_dim: int | None = 512  # width of the text encoder's hidden states; None = no text
    num_classes: int | None = None  # class-conditional mode (MaskGIT)
    mlp: str = "gelu"  # or "geglu"
    mlp_ratio: float = 4.0
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-6
    qk_norm: bool | str = False  # True/"rmsnorm", or "l2" (L2 norm x learned weight)
    bias: bool = True
    backend: str | None = None  # attention backend (None = best available)
    # Optional details of other ports (defaults keep the layout above):
    attn_scale: float | None = None  # softmax scale (None = 1/sqrt(head_dim))
    null_kv: bool = False  # learned null key/value prepended in every attention
    mlp_hidden_dim: int | None = None  # overrides int(dim * mlp_ratio)
    mlp_inner_norm: bool = False  # a norm on the MLP hidden activations (before proj_out)
    post_norm: bool = False  # NormFormer: a norm on each attention output before the residual add
    mlp_norm: str | None = None  # kind of the norm before the MLP (None = ``norm``)
    text_proj: str = "linear"  # "linear", "linear_norm" (Linear then norm) or "none" (K/V read text_dim)
    final_norm: bool = True  # False: no norm before the head
    head_mlp: bool = False  # BERT-style MLM head: Linear(dim, dim) -> GELU -> [norm] -> head
    head_mlp_norm: bool = True  # the norm inside ``head_mlp``
    norm_position: str = "pre"  # "post": BERT's x = norm(x + f(x)) instead of x + f(norm(x))
    embed_norm: bool = False  # a norm over the input embeddings (class token included) before the blocks
    gelu_approximate: str = "none"  # "tanh": the tanh GELU (jax.nn.gelu's default) in the MLPs and head_mlp

    def __post_init__(self):
        if (self.text_dim is None) == (self.num_classes is None):
            raise ValueError("set exactly one of text_dim (text-conditional) and num_classes (class-conditional)")
        for name in ("codebook_size", "grid_size", "dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_proj not in TEXT_PROJ_KINDS:
            raise ValueError(f"text_proj must be one of {TEXT_PROJ_KINDS}, got {self.text_proj!r}")
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"norm_position must be 'pre' or 'post', got {self.norm_position!r}")
        if self.norm_position == "post" and self.post_norm:
            raise ValueError("post_norm (NormFormer) norms are for pre-norm blocks: not with norm_position='post'")

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size


class TransformerBlock(nn.Module):
    """Pre-norm block: x += SelfAttn(norm(x)); [x += CrossAttn(norm(x), memory)]; x += MLP(norm(x)).
    With ``post_norm`` (NormFormer) each attention output is normed before its residual add.
    With ``norm_position="post"`` (BERT) each sub-layer is x = norm(x + f(x)), same norms."""

    def __init__(self, cfg: MuseTransformerConfig, *, cross: bool):
        super().__init__()
        kw = dict(head_dim=cfg.head_dim, bias=cfg.bias, qk_norm=cfg.qk_norm, backend=cfg.backend,
                  scale=cfg.attn_scale, null_kv=cfg.null_kv)
        context_dim = cfg.text_dim if cfg.text_proj == "none" else None
        post = cfg.post_norm
        self.norm1 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.num_heads, **kw)
        self.post_norm1 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if post else None
        self.norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cross else None
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, context_dim=context_dim, **kw) if cross else None
        self.post_norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cross and post else None
        self.norm3 = make_norm(cfg.mlp_norm or cfg.norm, cfg.dim, cfg.norm_eps)
        hidden = cfg.mlp_hidden_dim if cfg.mlp_hidden_dim is not None else int(cfg.dim * cfg.mlp_ratio)
        inner_norm = make_norm(cfg.norm, hidden, cfg.norm_eps) if cfg.mlp_inner_norm else None
        self.mlp = FeedForward(cfg.dim, hidden, cfg.mlp, bias=cfg.bias, inner_norm=inner_norm,
                               gelu_approximate=cfg.gelu_approximate)
        self.norm_after = cfg.norm_position == "post"

    def forward(self, x, kv: CrossAttentionKV | None = None, memory_mask: torch.Tensor | None = None, *,
                kv_store=None, rows: torch.Tensor | None = None):
        """x (B, L, dim); with ``rows`` (B, M) x holds only those rows of the sequence and the
        self-attention reads the other rows' K/V from ``kv_store`` (musefast.nn.row_cache)."""
        cache = dict(kv_store=kv_store, rows=rows)
        if self.norm_after:
            x = self.norm1(x + self.attn(x, **cache))
            if self.cross_attn is not None:
                x = self.norm2(x + self.cross_attn(x, kv=kv, key_padding_mask=memory_mask))
            return self.norm3(x + self.mlp(x))
        h = self.attn(self.norm1(x), **cache)
        x = x + (h if self.post_norm1 is None else self.post_norm1(h))
        if self.cross_attn is not None:
            h = self.cross_attn(self.norm2(x), kv=kv, key_padding_mask=memory_mask)
            x = x + (h if self.post_norm2 is None else self.post_norm2(h))
        return self.mlp(self.norm3(x), residual=x)


class Context(NamedTuple):
    """Per-layer cross-attention K/V of the memory, and its key padding mask (B, Lk) or None."""

    kvs: list
    mask: torch.Tensor | None

    @staticmethod
    def cat(contexts: list["Context"]) -> "Context":
        """Batch-concatenate contexts (e.g. cond + uncond for one CFG forward)."""
        kvs = [CrossAttentionKV(torch.cat([c.kvs[i].k for c in contexts]), torch.cat([c.kvs[i].v for c in contexts]))
               for i in range(len(contexts[0].kvs))]
        masks = [c.mask for c in contexts]
        if all(m is None for m in masks):
            return Context(kvs, None)
        num_keys = next(m.shape[1] for m in masks if m is not None)  # K may hold extra (null) keys
        masks = [torch.ones(c.kvs[0].k.shape[0], num_keys, dtype=torch.bool, device=c.kvs[0].k.device)
                 if m is None else m for c, m in zip(contexts, masks)]
        return Context(kvs, torch.cat(masks))


@register_component
class MuseTransformer(nn.Module):
    """Base masked transformer. tokens (B, h, w) or (B, N) int64 -> logits (B, N, codebook_size)."""

    config_class = MuseTransformerConfig

    def __init__(self, cfg: MuseTransformerConfig):
        super().__init__()
        self.config = cfg
        self.token_embed = nn.Embedding(cfg.codebook_size + 1, cfg.dim)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.seq_len, cfg.dim) * 0.02)
        text = cfg.text_dim is not None
        self.text_proj = nn.Linear(cfg.text_dim, cfg.dim) if text and cfg.text_proj != "none" else None
        self.text_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if text and cfg.text_proj == "linear_norm" else None
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim) if not text else None
        self.embed_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(TransformerBlock(cfg, cross=text) for _ in range(cfg.depth))
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.head_mlp = None
        if cfg.head_mlp:
            head_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.head_mlp_norm else nn.Identity()
            self.head_mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias),
                                          nn.GELU(approximate=cfg.gelu_approximate), head_norm)
        self.head = nn.Linear(cfg.dim, cfg.codebook_size)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def project_text(self, text_hidden: torch.Tensor) -> torch.Tensor:
        if self.config.text_dim is None:
            raise ValueError("this transformer is class-conditional: pass class_labels, not text")
        if text_hidden.dim() != 3 or text_hidden.shape[-1] != self.config.text_dim:
            raise ValueError(f"text embeddings must be (B, L, {self.config.text_dim}), got {tuple(text_hidden.shape)}")
        if self.text_proj is None:  # text_proj="none": the cross-attention K/V read the text itself
            return text_hidden
        h = self.text_proj(text_hidden)
        return h if self.text_norm is None else self.text_norm(h)

    def context_from_memory(self, memory: torch.Tensor, mask: torch.Tensor | None) -> Context:
        """Memory already projected (B, Lk, dim; text_dim with ``text_proj="none"``) -> per-layer K/V."""
        return Context([blk.cross_attn.precompute_kv(memory) for blk in self.blocks], mask)

    def prepare_context(self, text_hidden: torch.Tensor, text_mask: torch.Tensor | None = None) -> Context:
        """Project text (B, L, text_dim) once per generation; reuse the result at every step."""
        return self.context_from_memory(self.project_text(text_hidden), text_mask)

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype != torch.long:
            raise TypeError(f"tokens must be int64, got {tokens.dtype}")
        flat = tokens.reshape(tokens.shape[0], -1)
        if flat.shape[1] != self.config.seq_len:
            raise ValueError(f"expected {self.config.grid_size}x{self.config.grid_size} tokens, got shape {tuple(tokens.shape)}")
        return flat

    def forward(
        self,
        tokens: torch.Tensor,
        text_hidden: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        *,
        context: Context | None = None,
        class_labels: torch.Tensor | None = None,
        kv_store=None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> logits (B, N, codebook_size). Step cache (musefast.nn.row_cache): with ``kv_store``
        and ``rows=None`` the self-attention K/V are recorded; with ``rows`` (B, M) only those
        image positions are computed, against the recorded K/V, -> logits (B, M, codebook_size)."""
        flat = self._check_tokens(tokens)
        if rows is None:
            x = self.token_embed(flat) + self.pos_embed
        else:
            x = self.token_embed(flat.gather(1, rows)) + self.pos_embed[0][rows]
        cache = dict(kv_store=kv_store, rows=rows)
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError("class-conditional transformer: pass class_labels (B,) (num_classes = null class)")
            x = self.embed_norm(torch.cat([self.class_embed(class_labels)[:, None], x], dim=1))
            if rows is not None:  # the class token (key 0) attends to every token: always recomputed
                cache["rows"] = torch.cat([torch.zeros_like(rows[:, :1]), rows + 1], dim=1)
            for blk in self.blocks:
                x = blk(x, **cache)
            x = x[:, 1:]
        else:
            if context is None:
                if text_hidden is None:
                    raise ValueError("pass text_hidden (B, L, text_dim) or a prepared context")
                context = self.prepare_context(text_hidden, text_mask)
            x = self.embed_norm(x)
            for blk, kv in zip(self.blocks, context.kvs):
                x = blk(x, kv, context.mask, **cache)
        x = self.norm(x)
        if self.head_mlp is not None:
            x = self.head_mlp(x)
        return self.head(x)


@dataclass
class SuperResConfig:
    high: MuseTransformerConfig  # the high-res masked transformer (e.g. grid 64)
    low_codebook_size: int = 8192
    low_grid_size: int = 16
    encoder_depth: int = 4
    low_norm: bool = True  # False: the low-res embeddings enter the memory un-normed (lucidrains)

    def __post_init__(self):
        if isinstance(self.high, dict):  # read back from config.json
            self.high = MuseTransformerConfig(**self.high)


@register_component
class SuperResTransformer(nn.Module):
    """Muse §2.4: low-res tokens → encoder; [encoder output; projected text] is the memory of
    the high-res masked transformer."""

    config_class = SuperResConfig

    def __init__(self, cfg: SuperResConfig):
        super().__init__()
        if cfg.high.text_dim is None:
            raise ValueError("the super-res transformer is text-conditional: set high.text_dim")
        if cfg.high.text_proj == "none":
            raise ValueError("the super-res memory concatenates low-res embeddings with the projected text: "
                             "high.text_proj='none' is not supported")
        self.config = cfg
        high = cfg.high
        self.low_embed = nn.Embedding(cfg.low_codebook_size, high.dim)
        self.low_pos_embed = nn.Parameter(torch.randn(1, cfg.low_grid_size**2, high.dim) * 0.02)
        self.low_encoder = nn.ModuleList(TransformerBlock(high, cross=False) for _ in range(cfg.encoder_depth))
        self.low_norm = make_norm(high.norm, high.dim, high.norm_eps) if cfg.low_norm else nn.Identity()
        self.transformer = MuseTransformer(high)

    @property
    def mask_token_id(self) -> int:
        return self.transformer.mask_token_id

    def prepare_context(self, low_tokens: torch.Tensor, text_hidden: torch.Tensor,
                        text_mask: torch.Tensor | None = None) -> Context:
        low = low_tokens.reshape(low_tokens.shape[0], -1)
        if low.shape[1] != self.config.low_grid_size**2:
            raise ValueError(f"expected {self.config.low_grid_size}² low-res tokens, got shape {tuple(low_tokens.shape)}")
        h = self.low_embed(low) + self.low_pos_embed
        for blk in self.low_encoder:
            h = blk(h)
        memory = torch.cat([self.low_norm(h), self.transformer.project_text(text_hidden)], dim=1)
        mask = None
        if text_mask is not None:
            mask = torch.cat([torch.ones(low.shape, dtype=torch.bool, device=low.device), text_mask], dim=1)
        return self.transformer.context_from_memory(memory, mask)

    def forward(self, tokens, low_tokens=None, text_hidden=None, text_mask=None, *, context: Context | None = None,
                kv_store=None, rows: torch.Tensor | None = None):
        """``kv_store``/``rows``: the step cache, as :meth:`MuseTransformer.forward`."""
        if context is None:
            if low_tokens is None or text_hidden is None:
                raise ValueError("pass low_tokens and text_hidden, or a prepared context")
            context = self.prepare_context(low_tokens, text_hidden, text_mask)
        return self.transformer(tokens, context=context, kv_store=kv_store, rows=rows)
