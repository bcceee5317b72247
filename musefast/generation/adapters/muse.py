"""Muse (base + optional super-resolution) on the engine: the demo model, and open-muse,
lucidrains and google MaskGIT ports (they load as :class:`MusePipeline`)."""
from __future__ import annotations

import torch

from musefast.generation.adapters.base import Adapter, Stage
from musefast.generation.request import Request
from musefast.pipelines.images import to_mask, to_tensor


class MuseAdapter(Adapter):
    family = "muse"

    def defaults(self, request: Request) -> dict:
        s = self.pipe.settings
        return dict(num_steps=s.num_steps, guidance_scale=float(s.guidance_scale),
                    guidance_schedule=s.guidance_schedule, guidance_interval=s.guidance_interval,
                    temperature=float(s.temperature), choice_temperature=s.choice_temperature)

    def resolve(self, request: Request, model: str | None = None) -> Request:
        n = self.pipe.output_size
        if request.size is not None and tuple(request.size) != (n, n):
            raise ValueError(f"size {request.size} (height, width): this model works at ({n}, {n}) only")
        if request.strength is not None:
            raise ValueError("the Muse family has no image-to-image (strength); inpaint with a mask instead")
        if request.init_image is not None and request.mask is None:
            raise ValueError("the Muse family edits with a mask: pass mask with init_image")
        return super().resolve(request.replace(size=None if request.init_image is not None else (n, n)), model)

    def _settings(self, request: Request):
        return self.pipe._settings(dict(num_steps=request.num_steps, guidance_scale=request.guidance_scale,
                                        guidance_schedule=request.guidance_schedule,
                                        guidance_interval=request.guidance_interval,
                                        temperature=request.temperature,
                                        choice_temperature=request.choice_temperature))

    @torch.no_grad()
    def start(self, request: Request, backend: str | None = None) -> Stage:
        pipe = self.pipe
        cond, uncond = pipe._prepare(request.prompt, request.negative_prompt, request.prompt_embeds,
                                     request.negative_prompt_embeds, 1)
        if cond.batch_size != 1:
            raise ValueError(f"a request is one image; prompt_embeds holds {cond.batch_size}")
        state = None
        if request.init_image is not None:  # MusePipeline.inpaint's state, for one image
            img = to_tensor(request.init_image).to(pipe.device)
            img, pixel_mask, _ = pipe._fit(img, to_mask(request.mask), False, pipe.output_size)
            state = pipe._edit_state(img, pixel_mask)
        cfg = pipe.transformer.config
        tokens, masked = state["base"] if state else (
            torch.full((1, cfg.seq_len), cfg.mask_token_id, dtype=torch.long, device=pipe.device),
            torch.ones(1, cfg.seq_len, dtype=torch.bool, device=pipe.device))
        request_state = dict(cond=cond, uncond=uncond, state=state, backend=backend)
        return self._stage("base", request, request_state, tokens, masked, request.seed)

    def _stage(self, kind, request, request_state, tokens, masked, seed, low_tokens=None):
        st = request_state
        stage = self.pipe._stage(kind, tokens, masked, st["cond"], st["uncond"], self._settings(request), seed,
                                 st["backend"], low_tokens=low_tokens, cache=request.cache)
        stage.request_state = request_state
        return stage

    @torch.no_grad()
    def next_stage(self, request: Request, stage: Stage, tokens: torch.Tensor) -> Stage | None:
        pipe = self.pipe
        if stage.kind != "base" or pipe.super_res is None:
            return None
        st = stage.request_state
        hcfg = pipe.super_res.config.high
        high = (st["state"] or {}).get("high")
        tokens_h, masked_h = high if high else (
            torch.full((1, hcfg.seq_len), hcfg.mask_token_id, dtype=torch.long, device=pipe.device),
            torch.ones(1, hcfg.seq_len, dtype=torch.bool, device=pipe.device))
        low = tokens.reshape(1, *stage.grid)
        # the super-res stage's seed is the base stage's plus one, as MusePipeline
        return self._stage("super-res", request, st, tokens_h, masked_h, request.seed + 1, low_tokens=low)

    def run(self, kind, tokens, context, steps, num_steps):
        model = self.pipe._onload("transformer" if kind == "base" else "super_res")
        return model(tokens, context=context)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, kind: str = "base") -> torch.Tensor:
        return self.pipe.decode(tokens, high_res=kind != "base")

    def sampler_label(self) -> str:
        return self.pipe.settings.preset

    def components(self) -> dict:
        return self.pipe._modules()
