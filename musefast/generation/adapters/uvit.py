"""aMUSEd (diffusers' U-ViT: ``amused/amused-256`` / ``-512``) on the engine."""
from __future__ import annotations

import torch

from musefast.compat.amused_scheduler import choice_temperatures
from musefast.generation.adapters.base import Adapter, Stage
from musefast.generation.request import Request
from musefast.sampling import GuidedForward, MaskGitSampler, uses_guidance
from musefast.sampling.cache import batch_slice

MICRO_CROP, MICRO_AESTHETIC = (0, 0), 6  # diffusers' micro-conditioning defaults


class UVitAdapter(Adapter):
    family = "amused"
    text_to_image = (12, 10.0)  # (steps, guidance) of the family's pipelines
    edit = (12, 10.0)

    def defaults(self, request: Request) -> dict:
        steps, guidance = self.text_to_image if request.init_image is None else self.edit
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

    def _sampler(self, request: Request, use_cfg: bool, backend) -> MaskGitSampler:
        """As AmusedPipeline._run_fused builds it."""
        temps = choice_temperatures(request.num_steps, request.choice_temperature)
        return MaskGitSampler(
            "amused", backend=backend, progress=False, num_steps=request.num_steps, cache=request.cache,
            guidance_scale=request.guidance_scale if use_cfg else 1.0, guidance_schedule=request.guidance_schedule,
            guidance_interval=request.guidance_interval, temperature=request.temperature,
            choice_temperature=(float(temps[0]), float(temps[-1])),
            mask_schedule="linear" if request.mask is not None else self.pipe.masking_schedule)

    @torch.no_grad()
    def start(self, request: Request, backend: str | None = None) -> Stage:
        from musefast.pipelines.amused import _AnyPixelMask

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
            mask_image=None if request.mask is None else _AnyPixelMask(request.mask), latents=None, height=height,
            width=width, strength=request.strength, num_images_per_prompt=1, seed=request.seed, generator=None)
        micro = torch.tensor([width, height, *MICRO_CROP, MICRO_AESTHETIC], device=pipe.device, dtype=hidden.dtype)
        context = pipe.transformer.prepare_context(hidden, pooled, micro)
        # negatives come first in a guided context, as in diffusers
        forward = (GuidedForward(self._model(), batch_slice(context, slice(1, 2)), context, uncond_first=True)
                   if use_cfg else GuidedForward(self._model(), context))
        stage = Stage("base", forward, self._sampler(request, use_cfg, backend), tokens, tokens == pipe.mask_token_id,
                      tuple(tokens.shape), tuple(tokens.shape[1:]), pipe.mask_token_id, request.seed, step=start,
                      starting_mask_ratio=1.0 if ratio is None else ratio)
        return stage

    def _model(self):
        return self.pipe.transformer

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
