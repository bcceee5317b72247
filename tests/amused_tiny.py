"""Tiny random diffusers aMUSEd pipelines, built offline and saved as a full aMUSEd folder.

``make_tiny_amused(folder, style)`` writes ``model_index.json``, ``transformer/``, ``vqvae/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/`` with diffusers' own ``save_pretrained`` and
returns the diffusers objects. ``style="256"``: 4×4 tokens (16 px, f = 4), no down/upsampling,
no biases, like amused-256; ``style="512"``: 8×8 tokens (32 px) with the 2×2 down/upsampling of
amused-512, and biases everywhere so their conversion is exercised too. Every parameter is
perturbed away from its init (norm weights of 1, GRN and bias zeros would hide mapping bugs).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_text import make_tiny_clip

CODEBOOK = 32
VOCAB = 40  # codebook + mask + padding, as aMUSEd's 8192 + 64
MASK_ID = VOCAB - 1
TEXT_WIDTH, POOLED = 32, 24


def _perturb(module: torch.nn.Module, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def uvit_kwargs(style: str) -> dict:
    kw = dict(hidden_size=32, use_bias=False, cond_embed_dim=POOLED, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
              encoder_hidden_size=TEXT_WIDTH, vocab_size=VOCAB, codebook_size=CODEBOOK, in_channels=16,
              block_out_channels=24, num_res_blocks=2, block_num_heads=2, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=48, sample_size=4)
    if style == "512":
        kw.update(downsample=True, upsample=True, use_bias=True, sample_size=8)
    elif style != "256":
        raise ValueError(style)
    return kw


def make_uvit(style: str, seed: int = 0):
    from diffusers import UVit2DModel

    torch.manual_seed(seed)
    model = UVit2DModel(**uvit_kwargs(style)).eval()
    _perturb(model, 0.2, seed)
    return model


def make_vqmodel(seed: int = 0):
    """f = 4 (three levels), 32 codes of size 4, no mid-block attention, codebook lookup."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    vq = VQModel(block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                 num_vq_embeddings=CODEBOOK, norm_num_groups=4, mid_block_add_attention=False,
                 lookup_from_codebook=True, force_upcast=True, sample_size=16).eval()
    _perturb(vq, 0.05, seed + 1)
    return vq


def make_tiny_amused(folder: str | Path, style: str = "256", *, seed: int = 0, variant: str | None = None):
    """Save a tiny aMUSEd pipeline to ``folder``; returns the diffusers AmusedPipeline."""
    from diffusers import AmusedPipeline, AmusedScheduler
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    clip_dir = make_tiny_clip(folder / "_clip", hidden_size=TEXT_WIDTH, projection_dim=POOLED, max_length=16,
                              seed=seed)
    pipe = AmusedPipeline(
        vqvae=make_vqmodel(seed), tokenizer=CLIPTokenizer.from_pretrained(clip_dir),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(clip_dir).eval(),
        transformer=make_uvit(style, seed), scheduler=AmusedScheduler(mask_token_id=MASK_ID),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder, variant=variant)
    return pipe
