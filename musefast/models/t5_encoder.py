"""A T5 encoder in plain PyTorch, loaded without importing ``transformers``.

Importing transformers takes longer than importing torch itself, which dominated the start-up
of a ``musefast generate`` on the demo model (whose text encoder is a 2-layer T5). For a local
T5 folder with a ``tokenizer.json`` this module rebuilds the encoder from ``config.json`` +
``model.safetensors`` (same parameter names, same arithmetic as transformers'
``T5EncoderModel`` in eval mode: RMS layer norms, unscaled attention with a shared relative
position bias, ReLU or gated-GELU feed-forward) and tokenizes with the ``tokenizers`` library
from the same ``tokenizer.json`` transformers uses. transformers' model is its reference twin
(``tests/test_t5_encoder.py`` compares hidden states). Anything else falls back to transformers.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

_FEED_FORWARD = {"relu": (False, "relu"), "gated-gelu": (True, "gelu_new")}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class _RMSNorm(nn.Module):
    """T5's layer norm: no mean subtraction, no bias, variance in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


class _Attention(nn.Module):
    def __init__(self, cfg, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, self.d_kv).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # T5 does not scale by 1/sqrt(d)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o(torch.matmul(weights, v).transpose(1, 2).reshape(B, L, -1))


class _FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gated, act = _FEED_FORWARD[cfg.feed_forward_proj]
        self.act = F.relu if act == "relu" else (lambda t: F.gelu(t, approximate="tanh"))
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype))


class _Block(nn.Module):
    def __init__(self, cfg, has_bias: bool):
        super().__init__()
        attn = nn.Module()
        attn.SelfAttention = _Attention(cfg, has_bias)
        attn.layer_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        ff = nn.Module()
        ff.DenseReluDense = _FeedForward(cfg)
        ff.layer_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.layer = nn.ModuleList([attn, ff])

    def forward(self, x, bias):
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)
        return x + ff.DenseReluDense(ff.layer_norm(x))


def _buckets(length: int, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """T5's bidirectional relative-position buckets (L, L): exact for small distances, log-spaced beyond."""
    pos = torch.arange(length, dtype=torch.long, device=device)
    rel = pos[None, :] - pos[:, None]  # key - query
    half = num_buckets // 2
    out = (rel > 0).long() * half
    n = rel.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).to(torch.long)
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return out + torch.where(n < max_exact, n, large)


class T5Encoder(nn.Module):
    """transformers' ``T5EncoderModel`` (eval) with the same state-dict names and outputs."""

    def __init__(self, config: dict):
        super().__init__()
        self.config_dict = dict(config)
        self.config = SimpleNamespace(**config)
        cfg = self.config
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        enc = nn.Module()
        enc.block = nn.ModuleList([_Block(cfg, i == 0) for i in range(cfg.num_layers)])
        enc.final_layer_norm = _RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.encoder = enc

    @staticmethod
    def supports(config: dict) -> bool:
        return (config.get("model_type") == "t5" and config.get("feed_forward_proj", "relu") in _FEED_FORWARD
                and not config.get("is_decoder", False))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        x = self.shared(input_ids)
        L = input_ids.shape[1]
        cfg = self.config
        first = self.encoder.block[0].layer[0].SelfAttention
        buckets = _buckets(L, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, x.device)
        bias = first.relative_attention_bias(buckets).permute(2, 0, 1)[None].to(x.dtype)  # (1, H, L, L)
        if attention_mask is not None:
            bias = bias + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for block in self.encoder.block:
            x = block(x, bias)
        return SimpleNamespace(last_hidden_state=self.encoder.final_layer_norm(x))

    def save_pretrained(self, folder) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.config_dict, indent=2) + "\n")


class JSONTokenizer:
    """The slice of a transformers tokenizer that :class:`~musefast.models.text.TextEncoder`
    uses, over ``tokenizers.Tokenizer.from_file("tokenizer.json")``."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self._tok = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        settings = json.loads((self.folder / "tokenizer_config.json").read_text())
        self.model_max_length = settings.get("model_max_length", int(1e30))
        self.pad_token_id = self._tok.token_to_id(settings.get("pad_token", "<pad>"))

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    def __call__(self, prompts, *, padding=None, max_length=None, truncation=False, return_tensors=None):
        ids = [e.ids for e in self._tok.encode_batch(list(prompts))]
        if truncation:
            ids = [row[:max_length - 1] + row[-1:] if len(row) > max_length else row for row in ids]  # keep </s>
        if padding != "max_length":
            return {"input_ids": ids}
        mask = [[1] * len(row) + [0] * (max_length - len(row)) for row in ids]
        ids = [row + [self.pad_token_id] * (max_length - len(row)) for row in ids]
        return {"input_ids": torch.tensor(ids, dtype=torch.long), "attention_mask": torch.tensor(mask)}

    def save_pretrained(self, folder) -> None:
        for name in _TOKENIZER_FILES:
            if (self.folder / name).is_file() and Path(folder).resolve() != self.folder.resolve():
                shutil.copyfile(self.folder / name, Path(folder) / name)


def load_plain_t5(folder: Path, dtype: torch.dtype | None = None):
    """(T5Encoder, JSONTokenizer) for a local folder this module can read, else None."""
    from musefast.models.serialization import load_state_dict_file, load_weights_strict

    config_file, weights = folder / "config.json", folder / "model.safetensors"
    if not all(f.is_file() for f in (config_file, weights, folder / "tokenizer.json", folder / "tokenizer_config.json")):
        return None
    config = json.loads(config_file.read_text())
    if not T5Encoder.supports(config):
        return None
    model = T5Encoder(config)
    state = load_state_dict_file(weights)
    tied = state.pop("encoder.embed_tokens.weight", None)  # the same tensor as shared.weight
    if "shared.weight" not in state and tied is not None:
        state["shared.weight"] = tied
    load_weights_strict(model, state, source=str(weights))
    if dtype is not None:
        model.to(dtype)
    return model.eval(), JSONTokenizer(folder)
