"""aMUSEd pipelines of the real architectures with random weights, built offline (no hub, no
diffusers): for latency runs only (scripts/gpu_check.py), never for images worth looking at.

``"amused-256"`` / ``"amused-512"``: diffusers' UVit2DModel configs of the two checkpoints (22
layers × 1024, 16×16 or 32×32 tokens, the 512 one with 2×2 down/upsampling), their VQModel (f =
16, 8192 × 64 codebook) and a CLIP-L/14-sized text encoder with an offline test tokenizer.
``"tiny"``: the same topology a few thousand parameters wide (CPU rehearsals).
"""
from __future__ import annotations

import torch

from musefast import ops
from musefast.models.text import CLIPTextEncoder
from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.models.vqgan import VQGAN
from musefast.models.vqmodel import vqgan_config_from_diffusers
from musefast.pipelines.amused import AmusedPipeline

SIZES = ("tiny", "amused-256", "amused-512")
_UVIT = {
    "amused-256": dict(sample_size=16),  # the config defaults are amused-256's
    "amused-512": dict(sample_size=32, downsample=True, upsample=True),
    "tiny": dict(hidden_size=32, cond_embed_dim=24, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
                 encoder_hidden_size=32, vocab_size=72, codebook_size=64, in_channels=16, block_out_channels=24,
                 num_res_blocks=1, block_num_heads=2, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, sample_size=4),
}
_VQ = {
    "full": dict(block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2, latent_channels=64,
                 num_vq_embeddings=8192, norm_num_groups=32),
    "tiny": dict(block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4, num_vq_embeddings=64,
                 norm_num_groups=4),
}


def _clip(full: bool, hidden: int, projection: int) -> CLIPTextEncoder:
    from tiny_text import clip_vocab_and_merges  # tests/: an offline CLIP BPE vocabulary
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    config = CLIPTextConfig(
        vocab_size=49408 if full else len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=12 if full else 2, num_attention_heads=12 if full else 4, projection_dim=projection,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextEncoder(CLIPTextModelWithProjection(config).eval(), tokenizer)


def random_vqgan(full: bool) -> VQGAN:
    """aMUSEd's VQ (also MeissonFlow/Meissonic's: f = 16, 8192 x 64 codebook), or its tiny
    twin, with random weights on the current default device."""
    vq = dict(_VQ["full" if full else "tiny"])
    levels = len(vq["block_out_channels"])
    vq.update(down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
              mid_block_add_attention=False, lookup_from_codebook=True)
    return VQGAN(vqgan_config_from_diffusers(vq))


def random_amused(size: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> AmusedPipeline:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    torch.manual_seed(seed)
    full = size != "tiny"
    with torch.device(device):  # initialise in place: a 600M-parameter model is slow to fill on a CPU
        config = UVit2DConfig(**_UVIT[size])
        transformer = UVit2D(config)
        with torch.no_grad():  # norm weights of 1 and GRN zeros would make every layer alike
            for name, p in transformer.named_parameters():
                if "norm" in name or "gamma" in name or "beta" in name:
                    p.add_(0.1 * torch.randn_like(p))
        text = _clip(full, config.encoder_hidden_size, config.cond_embed_dim)
        vqvae = random_vqgan(full)
    pipe = AmusedPipeline(vqvae, text, transformer)
    return pipe.to(device=device, dtype=dtype)


def decoding_step(pipe: AmusedPipeline, batch: int):
    """One fused decoding step as the pipeline runs it (both CFG branches in one transformer
    forward, then ``cfg_sample_remask`` on the two halves), at the first step (all masked).
    Returns (step, inputs): ``step(*inputs) -> (tokens, masked)``; the text context is fixed
    (computed once per generation), the inputs are the tensors that change from step to step."""
    transformer = pipe.transformer
    cfg = transformer.config
    side, device, dtype = cfg.sample_size, transformer.device, transformer.dtype
    n, k = side * side, cfg.codebook_size
    hidden = torch.randn(2 * batch, 77, cfg.encoder_hidden_size, device=device, dtype=dtype)
    pooled = torch.randn(2 * batch, cfg.cond_embed_dim, device=device, dtype=dtype)
    micro = torch.tensor([16.0 * side] * 2 + [0.0, 0.0, 6.0], device=device, dtype=dtype)
    context = transformer.prepare_context(hidden, pooled, micro)

    def step(tokens, masked, num_to_mask):
        logits = transformer(torch.cat([tokens, tokens]), context=context).reshape(2 * batch, n, k)
        uncond, cond = logits.chunk(2)
        return ops.cfg_sample_remask(cond, uncond, tokens=tokens.reshape(batch, n), masked=masked,
                                     num_to_mask=num_to_mask, guidance_scale=10.0, choice_temperature=2.0,
                                     seed=0, step=0)

    tokens = torch.full((batch, side, side), transformer.mask_token_id, dtype=torch.long, device=device)
    masked = torch.ones(batch, n, dtype=torch.bool, device=device)
    num_to_mask = torch.full((batch,), n * 253 // 256, dtype=torch.long, device=device)
    return step, (tokens, masked, num_to_mask)
