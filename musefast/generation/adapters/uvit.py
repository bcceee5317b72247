"""aMUSEd (diffusers' U-ViT: ``amused/amused-256`` / ``-512``) on the engine."""
from __future__ import annotations

import torch

from musefast.generation.adapters.base import Adapter, Stage
from musefast.generation.request import Request
from musefast.pipelines.images import AnyPixelMask
from musefast.sampling import uses_guidance


class UVitAdapter(Adapter):
    family = "amused"

    def defaults(self, request: Request) -> dict:
        # (steps, guidance) of the family's pipelines, text to image and edits
        steps, guidance = self.pipe.DEFAULTS["text2image" if request.init_image is None else "image"]
        out = dict(num_steps=steps, guidance_scale=guidance, guidance_schedule="constant", temperature=1.0,
                   choice_temperature=(2.0, 0.0))
        if request.init_image is not None:
            out["strength"] = 1.0 if request.mask is not None else 0.5
        return out

    def resolve(self, request: Request, model: str | None = None) -> Request:
        if request.init_image is None:
            n = self.pipe.image_size
            height, width = request.size or (n, n)
            f = self.pipe.vae_scale_factor
            if height % f or width % f:
                raise ValueError(f"size {(height, width)} (height, width) must be multiples of {f} (the VQ's factor)")
            request = request.replace(size=(height, width))
        return super().resolve(request, model)

    @torch.no_grad()
    def start(self, request: Request, backend: str | None = None) -> Stage:
        pipe = self.pipe
        use_cfg = uses_guidance(request.guidance_scale)
        embeds, negative = _pair(request.prompt_embeds), _pair(request.negative_prompt_embeds)
        # AmusedPipeline's text encoding: ``encode_text`` where diffusers' ``encode_prompt`` took the name
        encode = getattr(pipe, "encode_text", None) or pipe.encode_prompt
        pooled, hidden, B = encode(
            request.prompt, request.negative_prompt, prompt_embeds=embeds[0], encoder_hidden_states=embeds[1],
            negative_prompt_embeds=negative[0], negative_encoder_hidden_states=negative[1], use_cfg=use_cfg)
        if B != 1:
            raise ValueError(f"a request is one image; prompt_embeds holds {B}")
        height, width = request.size or (None, None)
        tokens, start, ratio, height, width, *_ = pipe._initial_tokens(
            B=1, steps=request.num_steps, sampler="fused", temperature=None, image=request.init_image,
            mask_image=None if request.mask is None else AnyPixelMask(request.mask), latents=None, height=height,
            width=width, strength=request.strength, num_images_per_prompt=1, seed=request.seed, generator=None)
        return pipe._stage(pipe._context(hidden, pooled, height, width), tokens, steps=request.num_steps, start=start,
                           ratio=ratio, use_cfg=use_cfg, guidance_scale=request.guidance_scale,
                           guidance_schedule=request.guidance_schedule, guidance_interval=request.guidance_interval,
                           temperature=request.choice_temperature, inpaint=request.mask is not None,
                           seed=request.seed, backend=backend, cache=request.cache,
                           sampling_temperature=request.temperature)

    def run(self, kind, tokens, context, steps, num_steps):
        return self.pipe.transformer(tokens, context=context)

    def components(self) -> dict:
        pipe = self.pipe
        mods = {"transformer": pipe.transformer, "vqvae": pipe.vqvae}
        if pipe.text_encoder is not None:
            mods["text_encoder"] = pipe.text_encoder.model
        return mods


def _pair(embeds):
    """A request's embeddings for this family: a TextEmbeddings, or (pooled, hidden), or None."""
    if embeds is None:
        return None, None
    if isinstance(embeds, (tuple, list)):
        if len(embeds) != 2:
            raise ValueError("aMUSEd embeddings are (pooled (1, P), hidden (1, L, E)) or a TextEmbeddings")
        return embeds[0], embeds[1]
    return embeds, None
