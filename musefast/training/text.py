"""The demo's frozen text encoder: a tiny T5 encoder (transformers' ``T5EncoderModel``) with a
T5 tokenizer over the caption vocabulary, pre-trained on the captions and then frozen.

Where its weights come from: nothing is downloaded. The tokenizer is a T5 Unigram tokenizer
built in memory from the dataset's words (plus single letters and punctuation, so any text
tokenizes). The encoder starts from a seeded random initialisation and is trained for a few
hundred steps on one supervised objective: from the mean-pooled encoder output of a caption,
linear heads predict what each of the five slots holds (one of the colours or nothing, one of
the shapes or nothing). The empty prompt (used for classifier-free guidance) is trained to
predict "nothing" everywhere. Captions are augmented with a capitalised first word and a
trailing full stop so that "A red circle on the left." means the same as the plain caption.
The heads are then thrown away and the encoder is frozen; the masked transformer
cross-attends to its last hidden state (Muse's use of a frozen T5).
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from musefast.demo_data.shapes import COLOURS, SHAPES, SLOTS, ShapeSpec, parse_caption, vocabulary
from musefast.models.text import T5TextEncoder
from musefast.training.optim import set_lr, warmup_cosine_lr


@dataclass
class TextTrainConfig:
    """Size and training of the demo's T5 encoder."""

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 128
    max_length: int = 16  # the longest caption is 11 tokens with </s>
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    empty_prob: float = 0.1  # fraction of empty prompts in a batch


def build_tokenizer(max_length: int = 16):
    """T5 tokenizer: <pad>=0, </s>=1, <unk>=2, whole caption words (and "A"/"An"), then
    letters, digits and punctuation as fall-back pieces."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in vocabulary() + ["A", "An"]]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + ".,!?'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def build_text_encoder(cfg: TextTrainConfig, *, seed: int = 0) -> T5TextEncoder:
    """A seeded random-init T5 encoder + tokenizer (not yet trained)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tokenizer(cfg.max_length)
    config = T5Config(vocab_size=len(tokenizer), d_model=cfg.d_model, d_kv=cfg.d_model // cfg.num_heads,
                      d_ff=cfg.d_ff, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return T5TextEncoder(T5EncoderModel(config), tokenizer, max_length=cfg.max_length)


def slot_targets(objects: tuple[ShapeSpec, ...]) -> tuple[list[int], list[int]]:
    """Per slot: colour index (len(COLOURS) = empty) and shape index (len(SHAPES) = empty)."""
    colours, shapes = [len(COLOURS)] * len(SLOTS), [len(SHAPES)] * len(SLOTS)
    for o in objects:
        i = SLOTS.index(o.slot)
        colours[i], shapes[i] = list(COLOURS).index(o.colour), SHAPES.index(o.shape)
    return colours, shapes


def augment_caption(text: str, rng: np.random.Generator) -> str:
    """Random surface variation that keeps the meaning: capitalised first word, full stop."""
    if text and rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if text and rng.random() < 0.3:
        text += "."
    return text


def _pooled(encoder: T5TextEncoder, prompts: list[str]) -> torch.Tensor:
    ids, mask = encoder.tokenize(prompts)
    hidden = encoder.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def train_text_encoder(encoder: T5TextEncoder, captions_fn, cfg: TextTrainConfig, *, seed: int = 0,
                       log=None, progress: bool = True) -> dict:
    """Train ``encoder.model`` on the slot-prediction objective, then freeze it again.

    Args:
        encoder: from :func:`build_text_encoder`.
        captions_fn: ``captions_fn(start, count) -> list[str]`` of training captions.
        cfg: steps, batch size, learning rate, empty-prompt fraction.
        log: optional :class:`musefast.training.log.LossLog`.

    Returns:
        final metrics: ``loss`` and ``slot_accuracy`` (fraction of slots whose colour and
        shape are both predicted right) on the last batch.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    d = encoder.hidden_size
    heads = nn.ModuleDict({"colour": nn.Linear(d, len(SLOTS) * (len(COLOURS) + 1)),
                           "shape": nn.Linear(d, len(SLOTS) * (len(SHAPES) + 1))})
    model = encoder.model
    model.requires_grad_(True)
    model.train()
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    metrics = {}
    bar = tqdm(range(cfg.steps), desc="text encoder", disable=not progress)
    try:
        for step in bar:
            lr = warmup_cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.steps // 10)
            set_lr(opt, lr)
            captions = captions_fn(step * cfg.batch_size, cfg.batch_size)
            prompts, col_t, shp_t = [], [], []
            for text in captions:
                empty = rng.random() < cfg.empty_prob
                c, s = slot_targets(() if empty else parse_caption(text))
                prompts.append("" if empty else augment_caption(text, rng))
                col_t.append(c)
                shp_t.append(s)
            pooled = _pooled(encoder, prompts)
            col_logits = heads["colour"](pooled).view(len(prompts), len(SLOTS), -1)
            shp_logits = heads["shape"](pooled).view(len(prompts), len(SLOTS), -1)
            col_t, shp_t = torch.tensor(col_t), torch.tensor(shp_t)
            loss = F.cross_entropy(col_logits.flatten(0, 1), col_t.flatten()) + \
                F.cross_entropy(shp_logits.flatten(0, 1), shp_t.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                right = (col_logits.argmax(-1) == col_t) & (shp_logits.argmax(-1) == shp_t)
            metrics = {"loss": loss.item(), "slot_accuracy": right.float().mean().item()}
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['slot_accuracy']:.3f}")
            if log is not None:
                log.write("text_encoder", step, force=step == cfg.steps - 1, lr=lr, **metrics)
    finally:
        model.requires_grad_(False)
        encoder.train(False)  # frozen from here on
        encoder.clear_cache()
    return metrics
