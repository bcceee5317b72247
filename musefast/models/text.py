"""Frozen text encoders (through ``transformers``) and the text-embedding container.

* :class:`T5TextEncoder` — Muse's encoder (T5-XXL; any ``T5EncoderModel``): the last hidden
  state, with the tokenizer's attention mask (padding is masked in cross-attention).
* :class:`CLIPTextEncoder` — aMUSEd's encoder (``CLIPTextModelWithProjection``, CLIP-L/14):
  ``hidden_states[-2]`` as the sequence and the projected ``text_embeds`` as the pooled vector.
  As in aMUSEd, prompts are padded to the maximum length, no attention mask is given to CLIP,
  and the returned mask is all True (padding tokens are attended to downstream).

Both pad to a fixed ``max_length`` so that conditional and unconditional embeddings can be
batched together, and both keep an LRU cache of per-prompt embeddings for the prompts that
repeat across calls (the empty prompt, negative prompts): :meth:`TextEncoder.encode_cached`.
Precomputed embeddings enter through :func:`as_text_embeddings`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from musefast.compat._convert import check_dtype

ENCODER_CONFIG_NAME = "musefast_text_encoder.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# a word of a normalised prompt: anything between whitespace and ASCII punctuation
_WORDS = re.compile(r"[^\s!-/:-@\[-`{-~]+")


@dataclass
class TextEmbeddings:
    """Text conditioning for a batch of prompts.

    Attributes:
        hidden: (B, L, C) float — the token sequence (cross-attention memory).
        mask: (B, L) bool — True where a key may be attended to.
        pooled: (B, P) float or None — one vector per prompt (CLIP's projected embedding).
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def __post_init__(self):
        h, m, p = self.hidden, self.mask, self.pooled
        if not isinstance(h, torch.Tensor) or not h.is_floating_point() or h.dim() != 3:
            raise ValueError(f"TextEmbeddings.hidden must be a float tensor (B, L, C), got {_describe(h)}")
        if not isinstance(m, torch.Tensor) or m.dim() != 2 or tuple(m.shape) != tuple(h.shape[:2]):
            raise ValueError(f"TextEmbeddings.mask must be a (B, L) = {tuple(h.shape[:2])} tensor, got {_describe(m)}")
        if m.dtype != torch.bool:
            if m.is_floating_point() or m.is_complex():
                raise TypeError(f"TextEmbeddings.mask must be bool (True = attend) or integer 0/1, got {m.dtype}")
            self.mask = m = m != 0
        if m.device != h.device:
            raise ValueError(f"TextEmbeddings.mask is on {m.device} but hidden is on {h.device}")
        if p is not None:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.dim() != 2 or p.shape[0] != h.shape[0]:
                raise ValueError(f"TextEmbeddings.pooled must be None or a float tensor (B={h.shape[0]}, P), got {_describe(p)}")
            if p.device != h.device:
                raise ValueError(f"TextEmbeddings.pooled is on {p.device} but hidden is on {h.device}")

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def seq_len(self) -> int:
        return self.hidden.shape[1]

    def __len__(self) -> int:
        return self.batch_size

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "TextEmbeddings":
        """Move to ``device``; cast the float tensors (hidden, pooled) to ``dtype``."""
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextEmbeddings(self.hidden.to(device=device, dtype=dtype), self.mask.to(device=device), pooled)

    def __getitem__(self, index) -> "TextEmbeddings":
        """Select prompts along the batch (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        pooled = None if self.pooled is None else self.pooled[index]
        return TextEmbeddings(self.hidden[index], self.mask[index], pooled)

    def repeat_interleave(self, repeats: int) -> "TextEmbeddings":
        """Each prompt ``repeats`` times in a row (``num_images_per_prompt``)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(repeats, 0)
        return TextEmbeddings(self.hidden.repeat_interleave(repeats, 0), self.mask.repeat_interleave(repeats, 0), pooled)

    @staticmethod
    def cat(items: list["TextEmbeddings"]) -> "TextEmbeddings":
        """Concatenate along the batch (e.g. cond and uncond for one CFG forward)."""
        if not items:
            raise ValueError("TextEmbeddings.cat needs at least one item")
        if len({e.seq_len for e in items}) != 1:
            raise ValueError(f"cannot concatenate TextEmbeddings of different lengths {[e.seq_len for e in items]}")
        has_pooled = {e.pooled is not None for e in items}
        if len(has_pooled) != 1:
            raise ValueError("cannot concatenate TextEmbeddings with and without pooled vectors")
        pooled = torch.cat([e.pooled for e in items]) if has_pooled == {True} else None
        return TextEmbeddings(torch.cat([e.hidden for e in items]), torch.cat([e.mask for e in items]), pooled)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def as_text_embeddings(
    value: TextEmbeddings | torch.Tensor,
    *,
    hidden_size: int | None = None,
    pooled_size: int | None = None,
    batch_size: int | None = None,
    name: str = "text_embeddings",
) -> TextEmbeddings:
    """Validate precomputed text embeddings given instead of prompts.

    Args:
        value: a :class:`TextEmbeddings`, or a (B, L, C) float tensor (then every key is
            attended to and there is no pooled vector).
        hidden_size: required C, if the consumer has one.
        pooled_size: required P; when given, ``pooled`` must be present.
        batch_size: required B (e.g. the number of prompts it replaces).
        name: the argument's name in error messages.

    Returns:
        a TextEmbeddings. Raises TypeError/ValueError naming ``name`` when anything is off,
        including non-finite values.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 3:
            raise ValueError(f"{name} as a tensor must have shape (B, L, C), got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        value = TextEmbeddings(value, torch.ones(value.shape[:2], dtype=torch.bool, device=value.device))
    elif not isinstance(value, TextEmbeddings):
        raise TypeError(f"{name} must be a TextEmbeddings or a (B, L, C) tensor, got {type(value).__name__}")
    if hidden_size is not None and value.hidden.shape[2] != hidden_size:
        raise ValueError(f"{name}.hidden has width {value.hidden.shape[2]}, the model expects {hidden_size}")
    if pooled_size is not None:
        if value.pooled is None:
            raise ValueError(f"{name} has no pooled vector; the model needs one of size {pooled_size}")
        if value.pooled.shape[1] != pooled_size:
            raise ValueError(f"{name}.pooled has size {value.pooled.shape[1]}, the model expects {pooled_size}")
    if batch_size is not None and value.batch_size != batch_size:
        raise ValueError(f"{name} has batch size {value.batch_size}, expected {batch_size}")
    for field in ("hidden", "pooled"):
        t = getattr(value, field)
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}.{field} contains NaN or inf")
    return value


class TextProjection(nn.Module):
    """Linear map from the text encoder's width to the transformer's: (B, L, in) -> (B, L, out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class TextEncoder(nn.Module):
    """A frozen transformers text model + tokenizer -> :class:`TextEmbeddings`.

    Subclasses set ``model_class`` and implement :meth:`_embed`. The module is always in eval
    mode and its parameters never require grad; moving it (``.to``) clears the cache.

    Args:
        model: the transformers model.
        tokenizer: its tokenizer.
        max_length: prompts are truncated (with a warning) and padded to this many tokens.
        cache_size: how many prompts :meth:`encode_cached` keeps (least recently used dropped).
        normalize: lower-case prompts and read punctuation as spaces (for encoders trained on
            plain lower-case captions, like the demo's).
        closed_vocabulary: the encoder knows only the whole words of its tokenizer (the demo's):
            other words are dropped from the prompt with one warning naming them.
    """

    model_class: ClassVar[str]
    default_max_length: ClassVar[int | None] = None

    def __init__(self, model: nn.Module, tokenizer, *, max_length: int | None = None, cache_size: int = 8,
                 normalize: bool = False, closed_vocabulary: bool = False):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = self._pick_max_length(max_length)
        self.normalize = bool(normalize)
        self.closed_vocabulary = bool(closed_vocabulary)
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, TextEmbeddings] = OrderedDict()
        self.model.requires_grad_(False)
        self.train(False)

    # -- sizes -------------------------------------------------------------------------------

    def _model_positions(self) -> int | None:
        return None

    def _pick_max_length(self, max_length: int | None) -> int:
        limit = self._model_positions()
        if max_length is None:
            # A tokenizer saved without model_max_length reports ~1e30: never pad to that.
            tok_max = getattr(self.tokenizer, "model_max_length", None)
            candidates = [n for n in (tok_max, self.default_max_length, limit) if n and n < 1e9]
            max_length = min(candidates) if candidates else None
            if max_length is None:
                raise ValueError("max_length is not set and neither the tokenizer nor the model gives one")
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's {limit} position embeddings")
        return int(max_length)

    @property
    def hidden_size(self) -> int:
        """C of :attr:`TextEmbeddings.hidden`."""
        raise NotImplementedError

    @property
    def pooled_size(self) -> int | None:
        """P of :attr:`TextEmbeddings.pooled` (None: no pooled vector)."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- module state ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "TextEncoder":
        """Frozen encoder: always stays in eval mode (dropout off), whatever ``mode`` says."""
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        self._cache.clear()  # cached tensors would be on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    # -- encoding ----------------------------------------------------------------------------

    @staticmethod
    def _check_prompts(prompts) -> list[str]:
        if isinstance(prompts, str):
            return [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt (use '' for unconditional)")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"every prompt must be a str, got {bad[0]}")
        return list(prompts)

    @property
    def vocabulary(self) -> list[str]:
        """The whole words the tokenizer has one token for (what a closed vocabulary knows)."""
        marker = "\u2581"  # sentencepiece's word-start mark
        return sorted(piece[1:] for piece in self.tokenizer.get_vocab() if piece.startswith(marker) and len(piece) > 1)

    def prepare_prompts(self, prompts: list[str]) -> list[str]:
        """The text the tokenizer sees: normalised, and with a closed vocabulary only known
        words (one warning names the others)."""
        if not (self.normalize or self.closed_vocabulary):
            return prompts
        known = set(self.vocabulary) if self.closed_vocabulary else None
        unknown: dict[str, None] = {}
        out = []
        for prompt in prompts:
            text = prompt.lower() if self.normalize else prompt
            words = _WORDS.findall(text) if self.normalize else text.split()
            if known is not None:
                unknown.update((w, None) for w in words if w not in known)
                words = [w for w in words if w in known]
            out.append(" ".join(words))
        if unknown:
            listed = ", ".join(repr(w) for w in unknown)
            usable = sorted(w for w in known if not self.normalize or w == w.lower())
            warnings.warn(f"this text encoder does not know the word(s) {listed}: ignored. It knows only: "
                          f"{' '.join(usable)} (docs/models.md, 'The demo model')", UserWarning, stacklevel=4)
        return out

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids (B, max_length) int64, attention_mask (B, max_length) bool) on the model's device.

        A prompt longer than ``max_length`` tokens is cut there, with a warning."""
        prompts = self.prepare_prompts(prompts)
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        self._warn_if_truncated(prompts)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()

    def _warn_if_truncated(self, prompts: list[str]) -> None:
        # a cheap upper bound first: a token covers at least one character (plus the special ones)
        if all(len(p) + 2 <= self.max_length for p in prompts):
            return
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        long = [(p, n) for p, n in zip(prompts, lengths) if n > self.max_length]
        if long:
            p, n = long[0]
            shown = p if len(p) <= 60 else p[:57] + "..."
            more = f" (and {len(long) - 1} more prompts)" if len(long) > 1 else ""
            warnings.warn(f"prompt {shown!r} is {n} tokens long but this text encoder reads {self.max_length}: "
                          f"the rest is cut{more}; shorten it", UserWarning, stacklevel=4)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextEmbeddings:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> TextEmbeddings:
        """Prompts -> TextEmbeddings (B, max_length, hidden_size) on the model's device and dtype."""
        ids, mask = self.tokenize(self._check_prompts(prompts))
        return self._embed(ids, mask)

    forward = encode

    def encode_cached(self, prompts: str | list[str]) -> TextEmbeddings:
        """:meth:`encode` through the LRU cache: prompts seen recently are not re-encoded, and
        a cache hit returns exactly the earlier embeddings. Meant for the prompts that repeat
        (the empty prompt, negative prompts); new prompts are encoded in one batch."""
        prompts = self._check_prompts(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        fresh = {}
        if missing:
            embeddings = self.encode(missing)
            fresh = {p: embeddings[i] for i, p in enumerate(missing)}
        rows = []
        for p in prompts:
            row = fresh.get(p)
            if row is None:
                row = self._cache[p]
            rows.append(row)
            if self.cache_size:
                self._cache[p] = row
                self._cache.move_to_end(p)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return TextEmbeddings.cat(rows)

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- loading and saving --------------------------------------------------------------------

    def _settings(self) -> dict:
        settings = {"max_length": self.max_length}
        # written only when on, so that other encoders' saved settings stay as they were
        settings.update({k: True for k in ("normalize", "closed_vocabulary") if getattr(self, k)})
        return settings

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Model, tokenizer and the encoder settings (``musefast_text_encoder.json``) in one folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with _no_transformers_bars():
            self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        settings = {"_class": type(self).__name__, **self._settings()}
        (folder / ENCODER_CONFIG_NAME).write_text(json.dumps(settings, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        tokenizer_path: str | os.PathLike | None = None,
        *,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = False,
        **settings,
    ) -> "TextEncoder":
        """Load from a local folder or, only when ``path`` is a hub id that is not a local
        folder, from the Hugging Face hub.

        Args:
            path: folder (or hub id) with the model's config and weights.
            tokenizer_path: where the tokenizer is (default: ``path``).
            subfolder, tokenizer_subfolder: e.g. ``"text_encoder"`` and ``"tokenizer"`` for a
                diffusers pipeline folder.
            device, dtype: where to put the model and in which dtype to load it (default:
                transformers' default for the checkpoint).
            local_files_only: for hub ids, use only the local hub cache. Local folders never
                reach the network.
            **settings: encoder settings (``max_length``, ``cache_size``, ...); saved settings
                in ``musefast_text_encoder.json`` are the defaults.
        """
        import transformers

        if tokenizer_subfolder is None and tokenizer_path is None:
            tokenizer_subfolder = subfolder  # model and tokenizer share one folder
        model_src, model_local = _resolve_source(path, subfolder, "text encoder")
        tok_src, tok_local = _resolve_source(path if tokenizer_path is None else tokenizer_path,
                                             tokenizer_subfolder, "tokenizer")
        saved = _read_settings(model_src, subfolder) if model_local else {}
        saved_class = saved.pop("_class", cls.__name__)
        if saved_class != cls.__name__:
            raise ValueError(f"{path} holds a {saved_class}, not a {cls.__name__}: use load_text_encoder "
                             f"or {saved_class}.from_pretrained")
        check_dtype(dtype)  # "auto" is the loader's (musefast.pipelines.loading), not transformers'
        model_kw = {"dtype": dtype} if dtype is not None else {}
        with _no_transformers_bars():
            model = getattr(transformers, cls.model_class).from_pretrained(
                model_src, subfolder=subfolder or "", local_files_only=model_local or local_files_only, **model_kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            tok_src, subfolder=tokenizer_subfolder or "", local_files_only=tok_local or local_files_only)
        encoder = cls(model, tokenizer, **{**saved, **settings})
        if device is not None:
            encoder.to(device=device)
        return encoder


@contextlib.contextmanager
def _no_transformers_bars():
    """transformers draws "Loading weights" / "Writing model shards" bars for every model, even
    a tiny one: loading and saving a component is quiet in musefast."""
    from transformers.utils import logging as tf_logging

    was_on = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            tf_logging.enable_progress_bar()


def _resolve_source(path, subfolder: str | None, what: str) -> tuple[str, bool]:
    """(path, is_local). A local folder is used as is; a string shaped like a hub id that is not
    a local folder goes to the hub; anything else is a FileNotFoundError (never a download)."""
    path = os.fspath(path)
    full = Path(path) / subfolder if subfolder else Path(path)
    if full.is_dir():
        return path, True
    if Path(path).exists() or not _HUB_ID.match(path):
        raise FileNotFoundError(f"{what} folder not found: {full}")
    return path, False


def _read_settings(path: str, subfolder: str | None) -> dict:
    file = (Path(path) / subfolder if subfolder else Path(path)) / ENCODER_CONFIG_NAME
    return json.loads(file.read_text()) if file.is_file() else {}


class T5TextEncoder(TextEncoder):
    """T5 encoder (Muse): ``last_hidden_state`` with the tokenizer's attention mask.

    ``max_length`` defaults to min(tokenizer.model_max_length, 128). No pooled vector.
    """

    model_class = "T5EncoderModel"
    default_max_length = 128

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    def _embed(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask.long())
        return TextEmbeddings(out.last_hidden_state, attention_mask)


class CLIPTextEncoder(TextEncoder):
    """CLIP text encoder with projection (aMUSEd).

    Returns ``hidden_states[hidden_layer]`` (default -2, the penultimate layer, which skips
    the final LayerNorm, as aMUSEd) and the projected pooled ``text_embeds``. Prompts are padded
    to ``max_length`` (default: the tokenizer's model_max_length, at most the model's
    position embeddings) and CLIP gets no attention mask.

    Args:
        attend_padding: True (aMUSEd): the returned mask is all True, so cross-attention sees
            the padding tokens too; False: the tokenizer's mask.
        hidden_layer: which entry of ``hidden_states`` is the sequence.
    """

    model_class = "CLIPTextModelWithProjection"

    def __init__(self, model, tokenizer, *, max_length: int | None = None, cache_size: int = 8,
                 attend_padding: bool = True, hidden_layer: int = -2):
        self.attend_padding = bool(attend_padding)
        self.hidden_layer = int(hidden_layer)
        super().__init__(model, tokenizer, max_length=max_length, cache_size=cache_size)
        layers = self.model.config.num_hidden_layers
        if not -(layers + 1) <= self.hidden_layer <= layers:
            raise ValueError(f"hidden_layer={hidden_layer} is out of range for {layers} layers "
                             f"(hidden_states has {layers + 1} entries)")

    def _model_positions(self) -> int | None:
        return self.model.config.max_position_embeddings

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_size(self) -> int:
        return self.model.config.projection_dim

    def _settings(self) -> dict:
        return {**super()._settings(), "attend_padding": self.attend_padding, "hidden_layer": self.hidden_layer}

    def _embed(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        mask = torch.ones_like(attention_mask) if self.attend_padding else attention_mask
        return TextEmbeddings(out.hidden_states[self.hidden_layer], mask, out.text_embeds)


TEXT_ENCODERS: dict[str, type[TextEncoder]] = {"T5TextEncoder": T5TextEncoder, "CLIPTextEncoder": CLIPTextEncoder}
_BY_MODEL_TYPE = {"t5": T5TextEncoder, "clip_text_model": CLIPTextEncoder, "clip": CLIPTextEncoder}


def load_text_encoder(path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, *,
                      subfolder: str | None = None, **kwargs) -> TextEncoder:
    """Load a local text-encoder folder, picking the class from ``musefast_text_encoder.json``
    or else from the model's ``config.json`` ``model_type`` (t5 / clip_text_model)."""
    check_dtype(kwargs.get("dtype"))
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder not found: {folder}")
    name = _read_settings(str(path), subfolder).get("_class")
    if name is not None:
        cls = TEXT_ENCODERS.get(name)
        if cls is None:
            raise ValueError(f"{folder / ENCODER_CONFIG_NAME}: unknown text encoder class {name!r}")
    else:
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in {folder}: not a transformers model folder")
        model_type = json.loads(config_file.read_text()).get("model_type")
        cls = _BY_MODEL_TYPE.get(model_type)
        if cls is None:
            raise ValueError(f"{config_file}: model_type {model_type!r} is not a supported text encoder "
                             f"(supported: {sorted(_BY_MODEL_TYPE)})")
    if cls is T5TextEncoder and tokenizer_path is None:
        # a plain-PyTorch twin of transformers' T5 encoder: no transformers import (start-up time)
        from musefast.models.t5_encoder import load_plain_t5

        plain = load_plain_t5(folder, kwargs.get("dtype"))
        if plain is not None:
            device = kwargs.pop("device", None)
            kwargs.pop("dtype", None)
            kwargs.pop("local_files_only", None)
            saved = _read_settings(str(path), subfolder)
            saved.pop("_class", None)
            encoder = cls(*plain, **{**saved, **kwargs})
            if device is not None:
                encoder.to(device)
            return encoder
    return cls.from_pretrained(path, tokenizer_path, subfolder=subfolder, **kwargs)
