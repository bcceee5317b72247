"""Training the base masked transformer (Muse §2.3, MaskGIT §3.2).

Per training image with tokens t (N = h·w of them) and caption embedding c:

1. draw r ~ U[0, 1) and mask ⌈cos(π r / 2) · N⌉ positions (at least one) chosen uniformly
   (the cosine masking schedule; inputs there become the [MASK] id);
2. with probability ``cond_dropout`` (10%) replace c by the empty prompt's embedding, so the
   same model also gives the unconditional logits of classifier-free guidance;
3. loss = cross-entropy of the logits at the masked positions against the true tokens.

The text encoder is frozen, so its embeddings are computed once per distinct caption
(:class:`TextTable`); the VQGAN is frozen too, so images are tokenized once before training.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from musefast.models.transformer import MuseTransformer
from musefast.training.optim import set_lr, warmup_cosine_lr


@dataclass
class TransformerTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    cond_dropout: float = 0.1  # fraction of captions replaced by the empty prompt (for CFG)
    label_smoothing: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TextTable:
    """Frozen text embeddings, one row per distinct prompt.

    Attributes:
        hidden: (U, L, C) float; mask: (U, L) bool (True = attend);
        empty_id: the row of the empty prompt "" (the unconditional branch).
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    empty_id: int

    @classmethod
    def build(cls, encoder, prompts: list[str], *, batch_size: int = 256) -> tuple["TextTable", dict[str, int]]:
        """Encode every distinct prompt (plus "") once -> (table, {prompt: row})."""
        unique = list(dict.fromkeys([""] + list(prompts)))
        hidden, mask = [], []
        for i in range(0, len(unique), batch_size):
            emb = encoder.encode(unique[i:i + batch_size])
            hidden.append(emb.hidden.float())
            mask.append(emb.mask)
        rows = {p: i for i, p in enumerate(unique)}
        return cls(torch.cat(hidden), torch.cat(mask), rows[""]), rows


def cosine_mask(batch: int, seq_len: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """bool (batch, seq_len): per row, ⌈cos(π r / 2) · seq_len⌉ (≥ 1) uniformly chosen
    positions are True (masked), with r ~ U[0, 1) per row."""
    r = torch.rand(batch, generator=generator)
    count = torch.ceil(torch.cos(r * math.pi / 2) * seq_len).clamp(1, seq_len).long()
    ranks = torch.rand(batch, seq_len, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < count[:, None]


@contextlib.contextmanager
def attention_backend(model: torch.nn.Module, backend: str):
    """Run every attention module of ``model`` on ``backend`` inside the block (training needs
    one with autograd: ``sdpa``; the fused inference kernels have no backward)."""
    from musefast.nn.attention import _MultiHead

    modules = [m for m in model.modules() if isinstance(m, _MultiHead)]
    saved = [m.backend for m in modules]
    for m in modules:
        m.backend = backend
    try:
        yield model
    finally:
        for m, b in zip(modules, saved):
            m.backend = b


def masked_token_loss(model: MuseTransformer, tokens: torch.Tensor, masked: torch.Tensor, text_hidden: torch.Tensor,
                      text_mask: torch.Tensor, *, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N) int64, masked (B, N) bool -> (mean cross-entropy over masked positions,
    accuracy of the argmax there)."""
    inputs = tokens.masked_fill(masked, model.mask_token_id)
    logits = model(inputs, text_hidden, text_mask)
    target = tokens[masked]
    picked = logits[masked]
    loss = F.cross_entropy(picked.float(), target, label_smoothing=label_smoothing)
    with torch.no_grad():
        acc = (picked.argmax(-1) == target).float().mean()
    return loss, acc


def train_transformer(model: MuseTransformer, tokens: torch.Tensor, prompt_ids: torch.Tensor, text: TextTable,
                      cfg: TransformerTrainConfig, *, seed: int = 0, log=None, progress: bool = True) -> dict:
    """Train ``model`` in place on the masked-token objective.

    Args:
        model: a text-conditional :class:`MuseTransformer` whose grid matches the tokens.
        tokens: (M, N) int64 training images' tokens.
        prompt_ids: (M,) int64 row of each image's caption in ``text``.
        text: :class:`TextTable` of the frozen caption embeddings.
        cfg: :class:`TransformerTrainConfig`.
        log: optional :class:`musefast.training.log.LossLog`.

    Returns:
        the last step's ``loss`` and masked-token ``accuracy``.
    """
    from tqdm.auto import tqdm

    M, N = tokens.shape
    if prompt_ids.shape != (M,):
        raise ValueError(f"prompt_ids must have shape ({M},), got {tuple(prompt_ids.shape)}")
    if N != model.config.seq_len:
        raise ValueError(f"tokens have {N} positions, the transformer expects {model.config.seq_len}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))
    model.train()
    metrics = {}
    bar = tqdm(range(cfg.steps), desc="transformer", disable=not progress)
    with attention_backend(model, "sdpa"):
        for step in bar:
            lr = warmup_cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
            set_lr(opt, lr)
            idx = torch.randint(0, M, (cfg.batch_size,), generator=gen)
            rows = prompt_ids[idx].clone()
            rows[torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout] = text.empty_id
            masked = cosine_mask(cfg.batch_size, N, generator=gen)
            loss, acc = masked_token_loss(model, tokens[idx].to(device), masked.to(device), text.hidden[rows].to(device),
                                          text.mask[rows].to(device), label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            metrics = {"loss": loss.item(), "accuracy": acc.item()}
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")
            if log is not None:
                log.write("transformer", step, force=step == cfg.steps - 1, lr=lr, **metrics)
    model.eval()
    return metrics
