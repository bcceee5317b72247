"""Training the VQGAN tokenizer (Muse §2.2, without the adversarial term).

Loss per batch of images x in [0, 1]::

    L = mean(w · (|x - x̂| + (x - x̂)²))  +  ‖sg(z) - e‖² + β ‖z - sg(e)‖²

(reconstruction, then the codebook and commitment terms of
:meth:`musefast.nn.VectorQuantizer.forward`, whose straight-through estimator carries the
reconstruction gradient to the encoder). The optional perceptual and adversarial terms are not
used. The pixel weight w is 1 on the background and ``1 + foreground_weight`` elsewhere (the
background is each image's per-channel median colour): the shapes cover only ~10% of the
pixels, and without the weight a small VQGAN first learns to paint the background alone.

Codebook care, because a small VQ trained briefly otherwise uses a handful of codes: the
codebook starts as a random sample of encoder outputs, and every ``restart_every`` steps the
codes no batch has picked since the last check are moved onto random encoder outputs of the
current batch (the "random restart" of dead codes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

from musefast.models.vqgan import VQGAN
from musefast.training.optim import set_lr, warmup_cosine_lr


@dataclass
class VQGANTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    restart_every: int = 50  # dead-code restarts every this many steps (0 = never)
    restart_until: float = 0.8  # ... during this fraction of the run (the end settles)
    foreground_weight: float = 4.0  # extra reconstruction weight of non-background pixels
    channels_last: bool = True  # oneDNN convolutions on CPU run ~1.5-2x faster in NHWC


def _sample_rows(z: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random rows of the (N, D) feature matrix (with replacement when N < count)."""
    idx = torch.randint(0, z.shape[0], (count,), generator=gen)
    return z[idx]


def foreground_mask(images: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where a pixel differs from its image's per-channel median colour
    (the background of a shapes image) by more than ``threshold`` (sum over channels)."""
    background = images.flatten(2).median(dim=2).values[:, :, None, None]
    return ((images - background).abs().sum(1, keepdim=True) > threshold).to(images.dtype)


def vqgan_step(vqgan: VQGAN, images: torch.Tensor, *, foreground_weight: float = 0.0
               ) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """One forward of the training loss -> (loss, metrics, indices (B, h, w), features (N, D) detached)."""
    z = vqgan.encode_features(images)
    z_q, indices, vq_loss = vqgan.quantize(z)
    recon = vqgan.decode_features(z_q)
    weight = 1 + foreground_weight * foreground_mask(images) if foreground_weight else 1.0
    l1 = (weight * (recon - images).abs()).mean()
    l2 = (weight * (recon - images).pow(2)).mean()
    loss = l1 + l2 + vq_loss
    metrics = {k: v.item() for k, v in (("loss", loss), ("l1", l1), ("l2", l2), ("vq", vq_loss))}
    return loss, metrics, indices, z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def train_vqgan(vqgan: VQGAN, batches: Callable[[int, int], torch.Tensor], cfg: VQGANTrainConfig, *,
                seed: int = 0, log=None, progress: bool = True) -> dict:
    """Train ``vqgan`` in place.

    Args:
        vqgan: the model (float32).
        batches: ``batches(step, batch_size) -> images (B, 3, H, W)`` float in [0, 1].
        cfg: :class:`VQGANTrainConfig`.
        log: optional :class:`musefast.training.log.LossLog`.

    Returns:
        metrics of the last step plus ``codes_used`` (distinct codes over the last
        ``restart_every`` steps, or the last step when restarts are off).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    codebook = vqgan.quantize.embedding.weight
    K = codebook.shape[0]
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    vqgan.to(memory_format=fmt).train()
    opt = torch.optim.Adam(vqgan.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    usage = torch.zeros(K, dtype=torch.int64)
    metrics = {}
    bar = tqdm(range(cfg.steps), desc="vqgan", disable=not progress)
    for step in bar:
        lr = warmup_cosine_lr(step, cfg.steps, cfg.lr, warmup=cfg.warmup)
        set_lr(opt, lr)
        images = batches(step, cfg.batch_size).contiguous(memory_format=fmt)
        if step == 0:  # start the codebook on the encoder's output distribution
            with torch.no_grad():
                z0 = vqgan.encode_features(images).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
                codebook.copy_(_sample_rows(z0, K, gen) + 1e-3 * torch.randn(K, codebook.shape[1], generator=gen))
        loss, metrics, indices, z = vqgan_step(vqgan, images, foreground_weight=cfg.foreground_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(indices.flatten().cpu(), minlength=K)
        restart = cfg.restart_every and (step + 1) % cfg.restart_every == 0
        if restart or step == cfg.steps - 1:
            metrics["codes_used"] = int((usage > 0).sum())
            dead = (usage == 0).nonzero().squeeze(1)
            if restart and step < cfg.restart_until * cfg.steps and dead.numel():
                with torch.no_grad():
                    codebook[dead] = _sample_rows(z, dead.numel(), gen).to(codebook.dtype)
                metrics["codes_restarted"] = int(dead.numel())
            usage.zero_()
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", codes=metrics.get("codes_used", "-"))
        if log is not None:
            log.write("vqgan", step, force=bool(restart) or step == cfg.steps - 1, lr=lr, **metrics)
    vqgan.to(memory_format=torch.contiguous_format).eval()
    return metrics


@torch.no_grad()
def encode_dataset(vqgan: VQGAN, batches: Callable[[int, int], torch.Tensor], count: int, *,
                   batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Tokens of ``count`` images: ``batches(i, batch_size)`` gives chunk i -> (count, h*w) int64."""
    from tqdm.auto import tqdm

    vqgan.eval()
    out = []
    chunks = (count + batch_size - 1) // batch_size
    for i in tqdm(range(chunks), desc="tokenize", disable=not progress):
        images = batches(i, batch_size)[: count - i * batch_size]
        out.append(vqgan.encode(images).flatten(1))
    return torch.cat(out)


def reconstruction_scores(vqgan: VQGAN, images: torch.Tensor, captions: list[str]) -> dict:
    """How well the tokenizer keeps what the captions say: encode -> decode ``images``
    (B, 3, H, W) in [0, 1] and score the reconstructions with the checker
    (:func:`musefast.demo_data.checker.score`), plus their mean absolute error ``l1``. The
    colour / shape / position accuracies bound what the transformer can reach."""
    from musefast.demo_data.checker import score

    with torch.no_grad():
        recon = vqgan.decode(vqgan.encode(images)).float()
    return {"l1": float(F.l1_loss(recon, images)), **score(list(recon), captions)}
