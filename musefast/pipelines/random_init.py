"""Random-weight pipelines of a given architecture: for tests, benchmarks and smoke runs.

``"tiny"``: a few thousand parameters per component (CPU tests in seconds).
``"small"``: the paper's layout scaled down for CPU benchmarks — base 16×16 tokens (256 px,
f=16), super-res 32×32 tokens (256 px, f=8), width 256.
``"paper"``: about the Muse paper's sizes, random weights, for latency only — base ≈656M
parameters (24 layers, width 1280, GEGLU, 16×16 tokens; the paper's is 632M) and super-res
≈269M (3 low-res encoder + 12 high-res layers, width 1024, 64×64 tokens; the paper's 268M).
"""
from __future__ import annotations

import torch

from musefast.models.transformer import MuseTransformer, MuseTransformerConfig, SuperResConfig, SuperResTransformer
from musefast.models.vqgan import VQGAN, VQGANConfig
from musefast.pipelines.muse import MusePipeline, MuseSettings

SIZES = ("tiny", "small", "paper")


def _configs(size: str, text_dim: int):
    if size == "tiny":
        # base: 32 px, f=8, 4×4 tokens; super-res: 64 px, f=8, 8×8 tokens
        vq = VQGANConfig(channels=8, channel_mult=(1, 1, 2, 2), num_res_blocks=1, num_mid_blocks=1, z_channels=8,
                         embed_dim=8, codebook_size=64, norm_groups=4)
        base = MuseTransformerConfig(codebook_size=64, grid_size=4, dim=32, depth=2, num_heads=2, text_dim=text_dim)
        high = MuseTransformerConfig(codebook_size=64, grid_size=8, dim=32, depth=2, num_heads=2, text_dim=text_dim)
        return vq, base, vq, SuperResConfig(high=high, low_codebook_size=64, low_grid_size=4, encoder_depth=1)
    if size == "small":
        vq = VQGANConfig(channels=32, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=1, codebook_size=1024, embed_dim=64)
        vq_high = VQGANConfig(channels=32, channel_mult=(1, 1, 2, 4), num_res_blocks=1, codebook_size=1024, embed_dim=64)
        base = MuseTransformerConfig(codebook_size=1024, grid_size=16, dim=256, depth=4, num_heads=4, text_dim=text_dim)
        high = MuseTransformerConfig(codebook_size=1024, grid_size=32, dim=256, depth=2, num_heads=4, text_dim=text_dim)
        return vq, base, vq_high, SuperResConfig(high=high, low_codebook_size=1024, low_grid_size=16, encoder_depth=1)
    if size == "paper":
        # Muse §2: base 256 px → 16×16 tokens (f=16), super-res 512 px → 64×64 tokens (f=8).
        vq = VQGANConfig(channels=128, channel_mult=(1, 1, 2, 2, 4), codebook_size=8192, embed_dim=256)
        vq_high = VQGANConfig(channels=128, channel_mult=(1, 1, 2, 4), codebook_size=8192, embed_dim=256)
        base = MuseTransformerConfig(codebook_size=8192, grid_size=16, dim=1280, depth=24, num_heads=20,
                                     text_dim=text_dim, mlp="geglu", mlp_ratio=8 / 3)
        high = MuseTransformerConfig(codebook_size=8192, grid_size=64, dim=1024, depth=12, num_heads=16,
                                     text_dim=text_dim, mlp="geglu", mlp_ratio=8 / 3)
        return vq, base, vq_high, SuperResConfig(high=high, low_codebook_size=8192, low_grid_size=16, encoder_depth=3)
    raise ValueError(f"size must be one of {SIZES}, got {size!r}")


def random_pipeline(size: str = "tiny", *, super_res: bool = False, text_encoder=None, text_dim: int | None = None,
                    seed: int = 0, settings: MuseSettings | None = None) -> MusePipeline:
    """A pipeline with random weights. Without a text encoder, pass ``prompt_embeds`` of width
    ``text_dim`` (default 16 for tiny and small, 4096 — T5-XXL's width — for paper)."""
    if text_encoder is not None:
        text_dim = text_encoder.hidden_size
    elif text_dim is None:
        text_dim = 4096 if size == "paper" else 16
    vq_cfg, base_cfg, vq_high_cfg, sr_cfg = _configs(size, text_dim)
    torch.manual_seed(seed)
    pipe_kw = {}
    if super_res:
        pipe_kw = dict(super_res=SuperResTransformer(sr_cfg), vqgan_high=VQGAN(vq_high_cfg))
    return MusePipeline(VQGAN(vq_cfg), MuseTransformer(base_cfg), text_encoder, settings=settings, **pipe_kw)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
