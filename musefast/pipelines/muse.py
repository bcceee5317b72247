"""``MusePipeline``: text → image with a base (and optional super-res) Muse transformer, plus
zero-shot editing (Muse §3.3): inpainting, outpainting and mask-free editing.

Every stage decodes through :class:`musefast.sampling.MaskGitSampler`; the conditional and
unconditional branches of classifier-free guidance run batched in one forward, and the text
cross-attention K/V are projected once per generation.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch

from musefast.cpu import int8
from musefast.generation.adapters import Stage
from musefast.generation.pipeline_call import decode_stage
from musefast.models.serialization import load_component, read_json, save_component
from musefast.pipelines.loading import runnable
from musefast.ops.registry import use_backend
from musefast.models.text import TextEmbeddings, as_text_embeddings, load_text_encoder
from musefast.models.transformer import Context, MuseTransformer, SuperResTransformer
from musefast.models.vqgan import VQGAN
from musefast.pipelines.callbacks import CALLBACK_TENSOR_INPUTS, grid_reporter, step_hook
from musefast.pipelines.diffusers_api import PipelineConveniences, pipeline_output
from musefast.pipelines.shared import as_list, negatives_for
from musefast.pipelines.images import OUTPUT_TYPES, format_output, to_mask, to_tensor, token_mask
from musefast.pipelines.options import (check_device, diffusers_dtype, pick, resize_images,
                                        resize_mask, resolve_seed, size_error, to_arguments)
from musefast.sampling import GuidedForward, MaskGitSampler, check_guidance_scale, uses_guidance

PIPELINE_INDEX = "model_index.json"


def _scoped_backend(method):
    """``backend=`` of a pipeline call applies to every op inside it (attention, VQ and the
    decoding step), with MUSEFAST_BACKEND's meaning: one name, or ``op=name`` pairs."""

    @functools.wraps(method)
    def wrapper(self, *args, backend=None, **kwargs):
        with use_backend(backend):
            return method(self, *args, backend=None, **kwargs)

    return wrapper


@dataclass
class MuseSettings:
    """Decoding defaults, stored with the pipeline (any can be overridden per call)."""

    preset: str = "maskgit"  # sampler preset (musefast.sampling.presets); fields below override it
    num_steps: int = 24  # base stage (Muse paper)
    super_res_steps: int = 8
    guidance_scale: float = 4.0
    guidance_schedule: str = "constant"  # or "linear" (the Muse ramp), "cosine", "cosine_decay"
    guidance_interval: tuple | None = None  # (a, b): guidance only on that fraction of the steps
    temperature: float = 1.0
    choice_temperature: float = 4.5  # annealed by the preset's choice schedule (maskgit: ·(1 − r))
    mask_schedule: str = "cosine"
    # mask-free editing (Muse §3.3): resample this fraction of tokens per iteration
    edit_iterations: int = 100
    edit_fraction: float = 0.08
    edit_guidance_scale: float = 4.0
    edit_top_k: int = 3


class MusePipeline(PipelineConveniences):
    """Text-to-image Muse: VQGAN + text encoder + base transformer [+ super-res stage].

    Args:
        vqgan: tokenizer of the base resolution (its grid must match ``transformer``).
        transformer: :class:`MuseTransformer` (text-conditional).
        text_encoder: a musefast ``TextEncoder`` (T5 or CLIP), or None if you always pass
            ``prompt_embeds``.
        super_res: optional :class:`SuperResTransformer`, whose high-res tokens are decoded by
            ``vqgan_high``.
        settings: :class:`MuseSettings` defaults.
    """

    engine_family = "muse"  # the generation engine's adapter (musefast.generation.adapters)
    _component_names = ("vqgan", "transformer", "text_encoder", "super_res", "vqgan_high")
    _callback_tensor_inputs = list(CALLBACK_TENSOR_INPUTS)

    def __init__(self, vqgan: VQGAN, transformer: MuseTransformer, text_encoder=None, *,
                 super_res: SuperResTransformer | None = None, vqgan_high: VQGAN | None = None,
                 settings: MuseSettings | None = None):
        if (super_res is None) != (vqgan_high is None):
            raise ValueError("super_res and vqgan_high go together: pass both or neither")
        if transformer.config.text_dim is None:
            raise ValueError("MusePipeline needs a text-conditional transformer (text_dim set)")
        if vqgan.config.codebook_size != transformer.config.codebook_size:
            raise ValueError(f"vqgan codebook ({vqgan.config.codebook_size}) != transformer codebook "
                             f"({transformer.config.codebook_size})")
        if text_encoder is not None and text_encoder.hidden_size != transformer.config.text_dim:
            raise ValueError(f"text encoder width {text_encoder.hidden_size} != transformer text_dim "
                             f"{transformer.config.text_dim}")
        self.vqgan, self.transformer, self.text_encoder = vqgan, transformer, text_encoder
        self.super_res, self.vqgan_high = super_res, vqgan_high
        self.settings = settings or MuseSettings()
        # A model trained on a closed caption grammar (the demo) checks each prompt against it and
        # warns: off-grammar text gives an image that shows none of it.
        self.prompt_check: Callable[[str], None] | None = None
        self._offload_device: torch.device | None = None
        for module in self._modules().values():
            module.eval()

    # -- components ------------------------------------------------------------------------

    def _modules(self) -> dict:
        mods = {"vqgan": self.vqgan, "transformer": self.transformer, "text_encoder": self.text_encoder,
                "super_res": self.super_res, "vqgan_high": self.vqgan_high}
        return {k: v for k, v in mods.items() if v is not None}

    @property
    def device(self) -> torch.device:
        """Where the computation runs (the GPU under :meth:`enable_model_cpu_offload`)."""
        if self._offload_device is not None:
            return self._offload_device
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, *args, device=None, dtype=None) -> "MusePipeline":
        """``pipe.to("cuda")``, ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.float16)`` or keywords.

        A device that is not available here raises one ValueError saying so. The dtype applies
        to the transformers and VQGANs; the text encoder keeps its own dtype policy.
        """
        device, dtype = to_arguments(args, device, dtype)
        if device is not None:
            self._offload_device = None
        for name, module in self._modules().items():
            # tokenizers and text encoders keep their own dtype policy; VQGANs upcast themselves
            module.to(device=device, dtype=dtype if name != "text_encoder" else None)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device="cuda") -> None:
        """Keep every component on the CPU and move each to the GPU only while it runs (as
        diffusers): for GPUs without room for the whole pipeline. Needs a CUDA GPU."""
        target = torch.device(device) if gpu_id is None else torch.device(f"cuda:{gpu_id}")
        if target.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("enable_model_cpu_offload moves components between the CPU and a CUDA GPU, and no "
                               "CUDA GPU is available here: the pipeline already runs on the CPU, nothing to do")
        check_device(target)
        for module in self._modules().values():
            module.to("cpu")
        self._offload_device = target

    def _onload(self, name: str):
        """The component ``name``, on the device it runs on (others go back to the CPU under offload)."""
        module = self._modules()[name]
        if self._offload_device is not None:
            for other, m in self._modules().items():
                if other != name:
                    m.to("cpu")
            module.to(self._offload_device)
        return module

    @property
    def image_size(self) -> int:
        """Pixels per side of the base stage."""
        return self.transformer.config.grid_size * self.vqgan.downsampling_factor

    @property
    def output_size(self) -> int:
        if self.super_res is None:
            return self.image_size
        return self.super_res.config.high.grid_size * self.vqgan_high.downsampling_factor

    # -- text ------------------------------------------------------------------------------

    def encode_prompt(self, prompt, negative_prompt=None, *, prompt_embeds=None, negative_prompt_embeds=None):
        """-> (cond, uncond) TextEmbeddings on the pipeline's device, one row per prompt."""
        if prompt_embeds is not None:
            cond = as_text_embeddings(prompt_embeds, hidden_size=self.transformer.config.text_dim,
                                      name="prompt_embeds")
        else:
            prompts = as_list(prompt, "prompt")
            if self.prompt_check is not None:
                for text in dict.fromkeys(prompts):
                    self.prompt_check(text)
            cond = self._text_encoder().encode(prompts)
        n = cond.batch_size
        if negative_prompt_embeds is not None:
            uncond = as_text_embeddings(negative_prompt_embeds, hidden_size=self.transformer.config.text_dim,
                                        batch_size=n, name="negative_prompt_embeds")
        else:
            uncond = self._text_encoder().encode_cached(negatives_for(negative_prompt, n))  # "" and negatives repeat: cached
        if uncond.seq_len != cond.seq_len:
            raise ValueError(f"negative_prompt_embeds has {uncond.seq_len} tokens but prompt_embeds has "
                             f"{cond.seq_len}: pad both to one length (with a mask)")
        return cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype)

    def _text_encoder(self):
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds (and negative_prompt_embeds)")
        return self._onload("text_encoder")

    # -- tokens <-> images -----------------------------------------------------------------

    @torch.no_grad()
    def encode(self, image, *, high_res: bool | None = None) -> torch.Tensor:
        """Image(s) -> tokens (B, h, w) int64.

        ``high_res=None``: an image of the output size is encoded by the tokenizer that decodes
        the output (the high-res one when there is a super-res stage), so ``decode(encode(x))``
        round-trips and ``inpaint`` keeps exactly the unmasked tokens of ``encode(image)``.
        """
        img = to_tensor(image).to(self.device)
        if high_res is None:
            high_res = self.super_res is not None and img.shape[-1] == self.output_size
        if high_res and self.vqgan_high is None:
            raise ValueError("this pipeline has no super-res stage")
        return self._onload("vqgan_high" if high_res else "vqgan").encode(img)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, *, high_res: bool | None = None) -> torch.Tensor:
        """Tokens (B, h, w) -> images (B, 3, H, W) float in [0, 1]."""
        if high_res is None:
            high_res = self.super_res is not None and tokens.shape[-1] == self.super_res.config.high.grid_size
        vq = self._onload("vqgan_high" if high_res else "vqgan")
        return vq.decode(tokens.to(self.device)).float().clamp(0, 1)

    # -- decoding --------------------------------------------------------------------------

    def _settings(self, overrides: dict) -> MuseSettings:
        overrides = dict(overrides)
        overrides["num_steps"] = pick("num_steps", overrides.get("num_steps"), "num_inference_steps",
                                      overrides.pop("num_inference_steps", None))
        known = {f.name for f in fields(MuseSettings)}
        unknown = sorted(k for k, v in overrides.items() if k not in known)
        if unknown:
            raise TypeError(f"unexpected argument(s) {unknown}")
        s = replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})
        check_guidance_scale(s.guidance_scale)
        return s

    def _sampler(self, s: MuseSettings, num_steps: int, backend, progress, *, guidance_scale=None,
                 top_k: int | None = None, codebook_size: int | None = None, cache=None) -> MaskGitSampler:
        overrides = dict(num_steps=num_steps, mask_schedule=s.mask_schedule,
                         guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
                         guidance_schedule=s.guidance_schedule, guidance_interval=s.guidance_interval,
                         temperature=s.temperature, choice_temperature=s.choice_temperature)
        if top_k is not None:
            # presets express top-k as lucidrains' threshold: keep ceil((1 - thres) K) logits;
            # aim at the middle of the interval that gives exactly top_k
            overrides["topk_filter_thres"] = 1.0 - (top_k - 0.5) / codebook_size
        return MaskGitSampler(s.preset, backend=backend, progress=progress, cache=cache, **overrides)

    @staticmethod
    def _guided_forward(model, model_prepare, cond_args, uncond_args, use_cfg: bool) -> GuidedForward:
        """tokens (B, N) -> (cond, uncond) logits: both branches in one batched forward, or
        the conditional one alone on steps without guidance."""
        cond = model_prepare(*cond_args)
        both = Context.cat([cond, model_prepare(*uncond_args)]) if use_cfg else None
        return GuidedForward(model, cond, both)

    def _stage(self, kind: str, tokens, masked, cond: TextEmbeddings, uncond: TextEmbeddings, s: MuseSettings,
               seed, backend, *, low_tokens=None, num_steps=None, guidance_scale=None, top_k=None,
               cache=None) -> Stage:
        """The engine's job for one stage (``"base"`` / ``"super-res"``) of a call's rows: flat
        (B, N) ``tokens``/``masked``, the stage's model and prepared contexts, the preset."""
        g = s.guidance_scale if guidance_scale is None else guidance_scale
        use_cfg = uses_guidance(g)  # <= 1: the conditional branch alone (half the work), as diffusers
        if kind == "base":
            model = self._onload("transformer")
            forward = self._guided_forward(model, model.prepare_context, (cond.hidden, cond.mask),
                                           (uncond.hidden, uncond.mask), use_cfg)
            steps = s.num_steps if num_steps is None else num_steps
        else:
            model = self._onload("super_res")
            forward = self._guided_forward(model, model.prepare_context, (low_tokens, cond.hidden, cond.mask),
                                           (low_tokens, uncond.hidden, uncond.mask), use_cfg)
            steps = s.super_res_steps if num_steps is None else num_steps
        sampler = self._sampler(s, steps, backend, False, guidance_scale=g, cache=cache, top_k=top_k,
                                codebook_size=None if top_k is None else model.config.codebook_size)
        grid = _grid(model)
        return Stage(kind, forward, sampler, tokens, masked, tuple(tokens.shape), (grid, grid), model.mask_token_id,
                     seed)

    @torch.no_grad()
    def _decode_stage(self, *, stage: str, tokens, masked, cond: TextEmbeddings, uncond: TextEmbeddings,
                      s: MuseSettings, seed: int, backend, progress, low_tokens=None, num_steps=None,
                      guidance_scale=None, cache=None, hook=None, hook_offset: int = 0):
        """Run one stage on the generation engine from (tokens, masked) -> the final tokens (B, h, w)."""
        job = self._stage(stage, tokens, masked, cond, uncond, s, seed, backend, low_tokens=low_tokens,
                          num_steps=num_steps, guidance_scale=guidance_scale, cache=cache)
        report = None if hook is None else grid_reporter(hook, offset=hook_offset, num_steps=job.num_steps,
                                                         grid=job.grid, mask_token_id=job.mask_token_id)
        return decode_stage(self, job, backend=backend, progress=progress, desc=f"{s.preset} decoding",
                            callback=report)

    def _prepare(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt):
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        cond, uncond = self.encode_prompt(prompt, negative_prompt, prompt_embeds=prompt_embeds,
                                          negative_prompt_embeds=negative_prompt_embeds)
        return cond.repeat_interleave(num_images_per_prompt), uncond.repeat_interleave(num_images_per_prompt)

    def _prompts_for_images(self, num_images, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds):
        """Text for editing ``num_images`` images: one prompt for all, or one per image."""
        cond, uncond = self._prepare(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, 1)
        if cond.batch_size == num_images:
            return cond, uncond
        if cond.batch_size == 1:
            return cond.repeat_interleave(num_images), uncond.repeat_interleave(num_images)
        raise ValueError(f"{cond.batch_size} prompts for {num_images} images: pass one prompt, or one per image")

    def _run(self, cond, uncond, s, seed, backend, progress, *, base_tokens=None, base_masked=None,
             high_tokens=None, high_masked=None, cache=None, hook=None):
        """Base stage (from the given state, or all masked), then super-res if present;
        ``hook``: :func:`musefast.pipelines.callbacks.step_hook`'s, its steps counted through both."""
        B = cond.batch_size
        cfg = self.transformer.config
        if base_tokens is None:
            base_tokens = torch.full((B, cfg.seq_len), cfg.mask_token_id, dtype=torch.long, device=self.device)
            base_masked = torch.ones(B, cfg.seq_len, dtype=torch.bool, device=self.device)
        low = self._decode_stage(stage="base", tokens=base_tokens, masked=base_masked, cond=cond, uncond=uncond,
                                 s=s, seed=seed, backend=backend, progress=progress, cache=cache, hook=hook)
        low = low.view(B, cfg.grid_size, cfg.grid_size)
        if self.super_res is None:
            return low
        hcfg = self.super_res.config.high
        if high_tokens is None:
            high_tokens = torch.full((B, hcfg.seq_len), hcfg.mask_token_id, dtype=torch.long, device=self.device)
            high_masked = torch.ones(B, hcfg.seq_len, dtype=torch.bool, device=self.device)
        high = self._decode_stage(stage="super-res", tokens=high_tokens, masked=high_masked, cond=cond,
                                  uncond=uncond, s=s, seed=_next_seed(seed), backend=backend,
                                  progress=progress, low_tokens=low, cache=cache, hook=hook, hook_offset=s.num_steps)
        return high.view(B, hcfg.grid_size, hcfg.grid_size)

    def _output(self, tokens, output_type, return_dict=None, size=None):
        """Tokens -> what the call returns: the images (PIL images as a list that also answers
        ``.images``), or diffusers' output object (``return_dict=True``) / 1-tuple (False).
        ``size`` (height, width): resize the decoded images back to the caller's size."""
        if output_type == "tokens":
            images = tokens
        else:
            pixels = self.decode(tokens)
            if size is not None:
                pixels = resize_images(pixels, *size)
            images = format_output(pixels, output_type)
        return pipeline_output(images, return_dict)

    @staticmethod
    def _check_output_type(output_type):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    @_scoped_backend
    def __call__(self, prompt=None, *, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                 num_steps=None, super_res_steps=None, guidance_scale=None, guidance_schedule=None,
                 guidance_interval=None, temperature=None, choice_temperature=None, seed=None,
                 num_images_per_prompt=1, output_type="pil", backend=None, progress=True, cache=None,
                 num_inference_steps=None, generator=None, return_dict=None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=None):
        """Generate images for ``prompt`` (a string or a list of strings).

        Returns a list of PIL images that also answers ``.images`` (``output_type="pil"``), a
        numpy array (B, H, W, 3) (``"np"``), a tensor (B, 3, H, W) in [0, 1] (``"pt"``) or the
        tokens (``"tokens"``); ``return_dict=True`` wraps them in an object with ``.images``.
        ``guidance_scale`` <= 1 turns classifier-free guidance off (one branch, as diffusers).
        ``guidance_interval=(a, b)``: guidance only on the steps in that fraction of the
        decoding (the others run the conditional branch alone); ``cache``: the step cache —
        None (exact), ``"fast"`` or a :class:`musefast.StepCache` (musefast.sampling.cache).
        diffusers' names work too: ``num_inference_steps`` (= ``num_steps``) and ``generator``
        (a ``torch.Generator`` the seed is drawn from, instead of ``seed``). ``seed`` may be a
        list with one seed per image. ``callback_on_step_end(pipe, i, timestep, {"latents":
        tokens})`` runs after every step as in diffusers (``i`` counts through the base and the
        super-res steps; the token grid is the current stage's); the tokens it returns under
        ``"latents"`` replace the current ones.
        """
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass a prompt or prompt_embeds")
        self._check_output_type(output_type)
        s = self._settings(dict(num_steps=num_steps, num_inference_steps=num_inference_steps,
                                super_res_steps=super_res_steps, guidance_scale=guidance_scale,
                                guidance_schedule=guidance_schedule, guidance_interval=guidance_interval,
                                temperature=temperature, choice_temperature=choice_temperature))
        seed = resolve_seed(seed, generator)
        cond, uncond = self._prepare(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                     num_images_per_prompt)
        hook = step_hook(self, None, 1, callback_on_step_end, callback_on_step_end_tensor_inputs)
        tokens = self._run(cond, uncond, s, seed, backend, self._progress(progress), cache=cache, hook=hook)
        return self._output(tokens, output_type, return_dict)

    # -- zero-shot editing -----------------------------------------------------------------

    def _fit(self, img: torch.Tensor, pixel_mask: torch.Tensor | None, resize: bool, size: int):
        """Images (and mask) at the model's ``size``: resized when ``resize``, else checked.
        Returns (img, mask, the caller's (height, width) to resize the result back to, or None)."""
        H, W = img.shape[-2:]
        if pixel_mask is not None and tuple(pixel_mask.shape[-2:]) != (H, W):
            mh, mw = pixel_mask.shape[-2:]
            raise ValueError(f"mask is {mw}×{mh} but the image is {W}×{H} (width×height): give them one size")
        if (H, W) == (size, size):
            return img, pixel_mask, None
        if not resize:
            raise size_error("image", H, W, size)
        img = resize_images(img, size, size)
        pixel_mask = None if pixel_mask is None else resize_mask(pixel_mask, size, size)
        return img, pixel_mask, (H, W)

    def _edit_state(self, img, pixel_mask):
        """Encode the image at each stage and mask the tokens under the pixel mask."""
        B = img.shape[0]
        if pixel_mask.shape[0] not in (1, B):
            raise ValueError(f"mask batch ({pixel_mask.shape[0]}) must be 1 or match the images ({B})")
        pixel_mask = pixel_mask.to(self.device).expand(B, -1, -1)
        state = {}
        stages = [("base", "vqgan", "transformer")]
        if self.super_res is not None:
            stages.append(("high", "vqgan_high", "super_res"))
        for name, vq_name, model_name in stages:
            vq, model = self._onload(vq_name), self._modules()[model_name]
            f = self.output_size // (vq.downsampling_factor * _grid(model))
            src = img if f == 1 else torch.nn.functional.interpolate(img, scale_factor=1 / f, mode="area")
            m = pixel_mask if f == 1 else torch.nn.functional.max_pool2d(pixel_mask[:, None].float(), f)[:, 0] > 0
            tokens = vq.encode(src).flatten(1)
            tmask = token_mask(m, vq.downsampling_factor).flatten(1)
            state[name] = (tokens.masked_fill(tmask, model.mask_token_id), tmask)
        return state

    @_scoped_backend
    def inpaint(self, image, mask, prompt=None, *, negative_prompt=None, prompt_embeds=None,
                negative_prompt_embeds=None, seed=None, output_type="pil", backend=None, progress=True, cache=None,
                resize: bool = False, generator=None, return_dict=None, callback_on_step_end=None,
                callback_on_step_end_tensor_inputs=None, **overrides):
        """Repaint the region under ``mask`` (white / nonzero = repaint) following ``prompt``.

        Every token not under the mask keeps its ``encode(image)`` value exactly — with the
        step cache on too (``cache=``: known tokens are never resampled, whatever the
        logits); with a super-res stage both resolutions are inpainted (multi-scale). The image
        must have the model's size, or pass ``resize=True``: image and mask are resized to it
        and the result back to the image's size. ``overrides``: decoding settings
        (``num_steps`` / ``num_inference_steps``, ``guidance_scale``, ...); the callbacks as
        :meth:`__call__`.
        """
        self._check_output_type(output_type)
        img = to_tensor(image).to(self.device)
        img, pixel_mask, size = self._fit(img, to_mask(mask), resize, self.output_size)
        s = self._settings(overrides)
        seed = resolve_seed(seed, generator)
        state = self._edit_state(img, pixel_mask)
        cond, uncond = self._prompts_for_images(state["base"][0].shape[0], prompt, negative_prompt, prompt_embeds,
                                                negative_prompt_embeds)
        high = state.get("high", (None, None))
        hook = step_hook(self, None, 1, callback_on_step_end, callback_on_step_end_tensor_inputs)
        tokens = self._run(cond, uncond, s, seed, backend, self._progress(progress), base_tokens=state["base"][0],
                           base_masked=state["base"][1], high_tokens=high[0], high_masked=high[1], cache=cache,
                           hook=hook)
        return self._output(tokens, output_type, return_dict, size)

    def outpaint(self, image, prompt=None, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                 fill: float = 0.5, resize: bool = False, **kw):
        """Grow the canvas by the given pixel margins and generate the new region.

        The grown canvas must be the model's size, or pass ``resize=True`` (the canvas is
        resized to the model's size and the result back to the canvas size); tokens fully inside
        the original image are kept exactly (without resizing).
        """
        img = to_tensor(image)
        for name, v in dict(left=left, right=right, top=top, bottom=bottom).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int (pixels), got {v!r}")
        if left + right + top + bottom == 0:
            raise ValueError("outpaint needs at least one of left/right/top/bottom > 0")
        H, W = img.shape[-2] + top + bottom, img.shape[-1] + left + right
        if (H, W) != (self.output_size, self.output_size) and not resize:
            n = self.output_size
            raise ValueError(f"image {img.shape[-1]}×{img.shape[-2]} (width×height) grown by left={left} right={right} "
                             f"top={top} bottom={bottom} is {W}×{H}, but this model works at {n}×{n}: choose margins "
                             f"that make {n}×{n}, or pass resize=True (CLI: --resize)")
        canvas = torch.nn.functional.pad(img, (left, right, top, bottom), value=fill)
        mask = torch.ones(img.shape[0], H, W, dtype=torch.bool)
        mask[:, top:top + img.shape[-2], left:left + img.shape[-1]] = False
        return self.inpaint(canvas, mask, prompt, resize=resize, **kw)

    @_scoped_backend
    @torch.no_grad()
    def edit(self, image, prompt=None, *, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
             iterations=None, fraction=None, guidance_scale=None, top_k=None, seed=None, output_type="pil",
             backend=None, progress=True, cache=None, resize: bool = False, generator=None, return_dict=None):
        """Mask-free editing (Muse §3.3): ``iterations`` rounds, each resampling a random
        ``fraction`` of the base tokens in one step under ``prompt`` (guidance, top-k).
        ``cache`` is accepted for a uniform API; each round is a one-step decode, which is
        always a full step, so it computes exactly what ``cache=None`` does.

        The image must have the base stage's size, or pass ``resize=True`` (the result is
        resized back to the image's size)."""
        s = self.settings
        iterations = s.edit_iterations if iterations is None else iterations
        fraction = s.edit_fraction if fraction is None else fraction
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        g = check_guidance_scale(s.edit_guidance_scale if guidance_scale is None else guidance_scale)
        self._check_output_type(output_type)
        img, _, size = self._fit(to_tensor(image).to(self.device), None, resize, self.image_size)
        tokens = self._onload("vqgan").encode(img).flatten(1)
        B, N = tokens.shape
        cond, uncond = self._prompts_for_images(B, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        count = max(1, round(fraction * N))
        seed = resolve_seed(seed, generator)
        if isinstance(seed, list):
            raise ValueError("edit takes one seed (an int), not a list")
        gen = torch.Generator().manual_seed(seed)
        mask_token_id = self.transformer.mask_token_id
        top_k = s.edit_top_k if top_k is None else top_k
        from tqdm.auto import tqdm

        for it in tqdm(range(iterations), desc="musefast edit", disable=not self._progress(progress)):
            chosen = torch.rand(B, N, generator=gen).argsort(dim=1)[:, :count].to(self.device)
            masked = torch.zeros(B, N, dtype=torch.bool, device=self.device).scatter_(1, chosen, True)
            job = self._stage("base", tokens.masked_fill(masked, mask_token_id), masked, cond, uncond, s,
                              seed + it + 1, backend, num_steps=1, guidance_scale=g, top_k=top_k, cache=cache)
            tokens = decode_stage(self, job, backend=backend).flatten(1)  # one step: each round is one job
        tokens = tokens.view(B, self.transformer.config.grid_size, -1)
        return self._output(tokens, output_type, return_dict, size)

    # -- save / load -----------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """One sub-folder per component (config.json + model.safetensors) and model_index.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index = {"_class": type(self).__name__, "settings": asdict(self.settings), "components": {}}
        for name, module in self._modules().items():
            if name == "text_encoder":
                module.save_pretrained(folder / name)
            else:
                save_component(module, folder / name)
            index["components"][name] = name
        (folder / PIPELINE_INDEX).write_text(json.dumps(index, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device=None, dtype="auto",
                        torch_dtype=None, quantize: str | None = None) -> "MusePipeline":
        """Load a folder written by :meth:`save_pretrained`. ``dtype`` of the transformers:
        ``"auto"`` (default) = bfloat16 on a CPU with native bf16, else float32 (see
        :func:`musefast.pipelines.loading.resolve_dtype`); None = float32. The VQGANs stay float32.
        ``torch_dtype`` is diffusers' name for ``dtype``. ``quantize="int8"``: the transformers'
        linears in int8 (CPU with VNNI; :mod:`musefast.cpu.int8`), the rest in the weights' dtype
        under ``"auto"``."""
        dtype = diffusers_dtype(dtype, torch_dtype)
        int8.check(quantize, device)
        if quantize and dtype == "auto":  # int8 keeps the rest in the weights' dtype: closer logits, and no slower
            dtype = None
        folder = Path(folder)
        index_file = folder / PIPELINE_INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: not a musefast pipeline folder")
        index = read_json(index_file)
        parts = {}
        for name, sub in index["components"].items():
            path = folder / sub
            if not path.is_dir():
                raise FileNotFoundError(f"component {name!r} missing: {path}")
            try:
                parts[name] = (runnable(load_text_encoder(path, device=device)) if name == "text_encoder"
                               else runnable(load_component(path, device=device),
                                             dtype=None if name.startswith("vqgan") else dtype,
                                             quantize=quantize if name in ("transformer", "super_res") else None))
            except (OSError, ValueError, RuntimeError) as exc:
                message = str(exc)
                if str(path) not in message:  # transformers' errors do not always name the folder
                    message = f"{path}: {message}"
                raise ValueError(f"cannot load component {name!r}: {message}") from None
        for required in ("vqgan", "transformer"):
            if required not in parts:
                raise ValueError(f"{index_file} lists no {required!r} component")
        pipe = cls(parts["vqgan"], parts["transformer"], parts.get("text_encoder"),
                   super_res=parts.get("super_res"), vqgan_high=parts.get("vqgan_high"),
                   settings=MuseSettings(**index.get("settings", {})))
        return pipe


def _next_seed(seed):
    """The super-res stage's seed(s): the base stage's plus one."""
    return [s + 1 for s in seed] if isinstance(seed, list) else seed + 1


def _grid(model) -> int:
    return model.config.high.grid_size if isinstance(model, SuperResTransformer) else model.config.grid_size
