"""The demo's frozen text encoder: a tiny T5 encoder (transformers' ``T5EncoderModel``) with a
T5 tokenizer over the caption vocabulary, pre-trained on the captions and then frozen.

Where its weights come from: nothing is downloaded. The tokenizer is a T5 Unigram tokenizer
built in memory from the dataset's words (plus single letters and punctuation, so any text
tokenizes). The encoder starts from a seeded random initialisation and is trained for a few
hundred steps on one supervised, per-token objective: from each token's last hidden state a
linear head predicts the colour, the shape and the slot of the shape that token's word
describes (:func:`musefast.demo_data.shapes.caption_word_objects`: "a red circle" words their
shape, the relation words of a two-shape caption nothing and no loss). So every token carries
its shape's attributes side by side, and the masked transformer's cross-attention can bind
them: an image position in the left half attends to the tokens that say "left" and reads
their colour and shape. (A first version predicted the scene's five slots from the mean-pooled
output instead; on held-out two-shape captions it got 13% of the scenes right, while this
objective gets all of them right: the pooled vector must encode colour-slot conjunctions that a
64-wide encoder does not learn, and the transformer then swapped shapes between the slots.)
Captions are augmented with a capitalised first word and a trailing full stop so that "A red
circle on the left." means the same as the plain caption. The head is then thrown away and the
encoder frozen; the masked transformer cross-attends to its last hidden state (Muse's use of a
frozen T5).
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from musefast.demo_data.shapes import COLOURS, SHAPES, SLOTS, caption_word_objects, vocabulary
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
    steps: int = 600
    batch_size: int = 128
    lr: float = 5e-3
    empty_prob: float = 0.1  # fraction of empty prompts in a batch
    dropout: float = 0.0  # T5's dropout_rate while training (the shipped run used 0)


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
                      d_ff=cfg.d_ff, num_layers=cfg.num_layers, num_heads=cfg.num_heads, dropout_rate=cfg.dropout,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    # prompts are read as the captions were written (lower case, no punctuation), and words outside
    # the captions' vocabulary are reported and dropped rather than spelt out in letter pieces
    return T5TextEncoder(T5EncoderModel(config), tokenizer, max_length=cfg.max_length, normalize=True,
                         closed_vocabulary=True)


IGNORE = -100  # target of tokens that carry no shape (padding, </s>, relation words)


def augment_caption(text: str, rng: np.random.Generator) -> str:
    """Random surface variation that keeps the meaning: capitalised first word, full stop."""
    if text and rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if text and rng.random() < 0.3:
        text += "."
    return text


def token_targets(encoder: T5TextEncoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize ``prompts`` -> (input_ids (B, L), attention_mask (B, L), targets (B, L, 3)):
    per token the colour, shape and slot index of the shape its word describes, or
    :data:`IGNORE`."""
    enc = encoder.tokenizer(prompts, padding="max_length", max_length=encoder.max_length, truncation=True,
                            return_tensors="pt")
    colours = list(COLOURS)
    targets = torch.full((len(prompts), encoder.max_length, 3), IGNORE, dtype=torch.long)
    for i, text in enumerate(prompts):
        if not text:
            continue
        per_word = caption_word_objects(text)
        for j, w in enumerate(enc.word_ids(i)):
            if w is not None and w < len(per_word) and per_word[w] is not None:
                o = per_word[w]
                targets[i, j] = torch.tensor((colours.index(o.colour), SHAPES.index(o.shape), SLOTS.index(o.slot)))
    return enc["input_ids"], enc["attention_mask"].bool(), targets


def train_text_encoder(encoder: T5TextEncoder, captions_fn, cfg: TextTrainConfig, *, seed: int = 0,
                       log=None, progress: bool = True, held_out: list[str] | None = None) -> dict:
    """Train ``encoder.model`` on the per-token objective (see the module docstring), then
    freeze it again.

    Args:
        encoder: from :func:`build_text_encoder`.
        captions_fn: ``captions_fn(start, count) -> list[str]`` of training captions.
        cfg: steps, batch size, learning rate, empty-prompt fraction.
        log: optional :class:`musefast.training.log.LossLog`.
        held_out: captions never trained on, scored after training.

    Returns:
        final metrics on the last batch: ``loss``, ``token_accuracy`` (tokens with colour, shape
        and slot all right) and ``caption_accuracy`` (captions with every token right); with
        ``held_out``, also ``held_out_token_accuracy`` and ``held_out_caption_accuracy``.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    sizes = (len(COLOURS), len(SHAPES), len(SLOTS))
    head = nn.Linear(encoder.hidden_size, sum(sizes)).to(encoder.device)
    model = encoder.model
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=cfg.lr, weight_decay=0.01)

    def forward(prompts):
        ids, mask, targets = (t.to(encoder.device) for t in token_targets(encoder, prompts))
        hidden = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        logits = head(hidden.float()).split(sizes, dim=-1)
        loss = sum(F.cross_entropy(lg.flatten(0, 1), targets[..., k].flatten(), ignore_index=IGNORE)
                   for k, lg in enumerate(logits))
        with torch.no_grad():
            carries = targets[..., 0] != IGNORE
            right = torch.stack([lg.argmax(-1) == targets[..., k] for k, lg in enumerate(logits)], -1).all(-1)
            scores = {"token_accuracy": right[carries].float().mean().item(),
                      "caption_accuracy": (right | ~carries).all(1).float().mean().item()}
        return loss, scores

    metrics = {}
    bar = tqdm(range(cfg.steps), desc="text encoder", disable=not progress)
    try:
        for step in bar:
            lr = warmup_cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.steps // 10)
            set_lr(opt, lr)
            prompts = ["" if rng.random() < cfg.empty_prob else augment_caption(text, rng)
                       for text in captions_fn(step * cfg.batch_size, cfg.batch_size)]
            loss, scores = forward(prompts)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            metrics = {"loss": loss.item(), **scores}
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['caption_accuracy']:.3f}")
            if log is not None:
                log.write("text_encoder", step, force=step == cfg.steps - 1, lr=lr, **metrics)
        if held_out:
            model.eval()
            with torch.no_grad():
                metrics.update({f"held_out_{k}": v for k, v in forward(list(held_out))[1].items()})
    finally:
        model.requires_grad_(False)
        encoder.train(False)  # frozen from here on
        encoder.clear_cache()
    return metrics
