"""Tiny random T5 and CLIP text encoders with real tokenizers, built offline for tests.

Each builder writes a folder loadable with ``from_pretrained`` (model ``config.json`` +
``model.safetensors`` + tokenizer files) and returns its path. Nothing touches the hub: the
tokenizers are constructed from an in-memory vocabulary (a T5 Unigram vocabulary, a CLIP
byte-level BPE vocabulary with a few merges) instead of downloaded files.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

# A few whole words so that prompts do not tokenize into letters only.
_WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "in", "house", "tree"]


def t5_vocab() -> list[tuple[str, float]]:
    """T5 Unigram vocabulary: <pad>=0, </s>=1, <unk>=2, then pieces with log-probability scores."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -3.0) for w in _WORDS]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ",.!?'-"]
    return vocab


def make_tiny_t5(folder: str | Path, *, d_model: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """A random T5EncoderModel (d_model, 4 heads) with a T5Tokenizer, saved to ``folder``."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    tokenizer = T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=512)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model,
        num_layers=num_layers, num_heads=4, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to one printable character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary: every byte (alone and word-final), the words of _WORDS, specials."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for w in _WORDS:
        if len(w) < 2:
            continue
        # left-to-right merges building "w</w>": ("p", "h") -> "ph", ("ph", "o") -> "pho", ...
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merges.append((cur, nxt))
            cur = cur + nxt
            if cur not in tokens:
                tokens.append(cur)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for t in tokens:
        seen.setdefault(t, len(seen))
    return seen, list(dict.fromkeys(merges))


def make_tiny_clip(folder: str | Path, *, hidden_size: int = 32, projection_dim: int = 24, num_layers: int = 3,
                   max_length: int = 16, seed: int = 0) -> Path:
    """A random CLIPTextModelWithProjection with a CLIPTokenizer (model_max_length=max_length)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    vocab, merges = clip_vocab_and_merges()
    # model_max_length must be set: padding="max_length" would otherwise pad to a huge default.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        projection_dim=projection_dim, num_hidden_layers=num_layers, num_attention_heads=4,
        max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
