"""``MeissonicPipeline``: MeissonFlow/Meissonic (1024²) and Monetico (512²) on musefast.

Loads the peer's pipeline folder (viiika/Meissonic: ``model_index.json``, ``transformer/`` — a
:class:`MeissonicTransformer`, recognised by its config keys —, ``vqvae/`` (a diffusers VQModel,
f = 16), ``text_encoder/`` + ``tokenizer/`` (CLIP-H with projection), ``scheduler/``) and takes the
peer ``Pipeline``'s call arguments and defaults: 48 steps, guidance 9, 1024², choice temperature
(2, 0), micro-conditioning, negative prompts, ``generator``, ``output_type`` (plus ``"tokens"``).
``image=`` (+ ``mask_image=``) runs the peer's image-to-image / inpainting pipelines (their
defaults: 12 steps, guidance 10, strength 0.5 / 1.0, inpainting on the linear schedule).

Everything but the model call is :class:`AmusedPipeline`'s (the peer's scheduler and pipeline
logic are aMUSEd's): the ``"compat"`` sampler consumes the generator exactly as the peer's
scheduler (same tokens per seed), the default ``"fused"`` one runs musefast's fused step. What
differs is the transformer: it takes the step's timestep, and its rotary image ids follow its own
``downsample`` flag (the peer picks them by ``height == 1024``; the two agree for the released
models at their native sizes). Prompts are padded to 77 tokens as the peer does.
"""
from __future__ import annotations

import json
import os

import torch

from musefast.compat.meissonic import is_meissonic_transformer
from musefast.cpu import conv as cpu_conv, int8, linear as cpu_engine
from musefast.models.meissonic import MeissonicTransformer
from musefast.models.text import CLIPTextEncoder
from musefast.models.vqgan import VQGAN
from musefast.models.vqmodel import load_vqmodel
from musefast.pipelines.amused import (
    OUTPUT_TYPES,
    PIPELINE_INDEX,
    AmusedPipeline,
    _check_sampler,
    _load_clip,
    _present,
    _resolve,
)
from musefast.pipelines.shared import file_dtype
from musefast.pipelines.peer_components import (
    convert_components,
    convert_meissonic_transformer,
    is_peer_meissonic_transformer,
)
from musefast.sampling import GuidedForward, check_guidance_scale, uses_guidance
from musefast.sampling.cache import batch_slice

TEXT_LENGTH = 77  # the peer pads and truncates every prompt to 77 tokens, whatever the tokenizer says
DEFAULTS = {"text2image": (48, 9.0), "image": (12, 10.0)}  # (steps, guidance) of the peer's pipelines


class MeissonicPipeline(AmusedPipeline):
    """Meissonic / Monetico text-to-image, image-to-image and inpainting.

    Built from musefast's components, or by keyword from the peer's own objects, as its
    ``Pipeline(vqvae=VQModel, tokenizer=CLIPTokenizer, text_encoder=CLIPTextModelWithProjection,
    transformer=Transformer2DModel, scheduler=Scheduler)``: converted once, here (see
    :class:`AmusedPipeline`; prompts are then padded to the peer's 77 tokens).

    Args:
        vqvae: the VQ tokenizer (float32); text_encoder: a :class:`CLIPTextEncoder` (or None if
            you always pass embeddings); transformer: the :class:`MeissonicTransformer`;
        mask_token_id: the [MASK] id (default: the transformer's ``vocab_size − 1``);
        masking_schedule, sampler: as :class:`AmusedPipeline`.
    """

    def __init__(self, vqvae: VQGAN | None = None, text_encoder: CLIPTextEncoder | None = None,
                 transformer: MeissonicTransformer | None = None, scheduler=None, *, tokenizer=None,
                 mask_token_id: int | None = None, masking_schedule: str | None = None, sampler: str = "fused"):
        c = convert_components(vqvae, text_encoder, transformer, tokenizer, scheduler,
                               transformer_class="Transformer2DModel (Meissonic)",
                               is_peer_transformer=is_peer_meissonic_transformer,
                               convert_peer_transformer=convert_meissonic_transformer, text_max_length=TEXT_LENGTH)
        vqvae, text_encoder, transformer = c.vqvae, c.text_encoder, c.transformer
        mask_token_id, masking_schedule = self._take_peer_settings(c, mask_token_id, masking_schedule)
        cfg = transformer.config
        if vqvae.config.codebook_size != cfg.codebook_size:
            raise ValueError(f"vqvae codebook ({vqvae.config.codebook_size}) != transformer codebook_size "
                             f"({cfg.codebook_size})")
        if text_encoder is not None and (text_encoder.hidden_size, text_encoder.pooled_size) != (
                cfg.joint_attention_dim, cfg.pooled_projection_dim):
            raise ValueError(f"text encoder (width {text_encoder.hidden_size}, projection {text_encoder.pooled_size})"
                             f" does not fit the transformer (joint_attention_dim {cfg.joint_attention_dim}, "
                             f"pooled_projection_dim {cfg.pooled_projection_dim})")
        self.vqvae, self.text_encoder, self.transformer = vqvae.float().eval(), text_encoder, transformer.eval()
        self.mask_token_id = cfg.mask_token_id if mask_token_id is None else int(mask_token_id)
        if not cfg.codebook_size <= self.mask_token_id < cfg.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} must lie in [codebook_size, vocab_size) = "
                             f"[{cfg.codebook_size}, {cfg.vocab_size})")
        if masking_schedule not in ("cosine", "linear"):
            raise ValueError(f"masking_schedule must be 'cosine' or 'linear', got {masking_schedule!r}")
        self.masking_schedule = masking_schedule
        self.sampler = _check_sampler(sampler)
        self._compat_source: dict | None = None  # set by from_pretrained when dtype="auto" changed the dtype
        self._compat_twin: MeissonicPipeline | None = None

    encode_prompt = AmusedPipeline.encode_text  # musefast's earlier name, kept for Meissonic callers

    def save_pretrained(self, save_directory, **kwargs) -> None:
        raise NotImplementedError("MeissonicPipeline.save_pretrained is not implemented: the peer's folder layout "
                                  "names its own source classes (src.transformer); keep the folder you loaded from")

    @classmethod
    def from_pretrained(cls, folder_or_hub_id: str | os.PathLike, *, variant: str | None = None,
                        dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        text_encoder: CLIPTextEncoder | None = None, sampler: str = "fused",
                        backend: str | None = None, local_files_only: bool = False,
                        quantize: str | None = None) -> "MeissonicPipeline":
        """Load a Meissonic/Monetico pipeline folder or hub id (``MeissonFlow/Meissonic``;
        downloaded with huggingface_hub only when it is not a local folder).

        Args:
            variant: weight variant (``"fp16"``): its files are used where present (only they
                are downloaded for a hub id); a folder holding only a variant loads it anyway.
            dtype, device: the transformer's and text encoder's dtype (default: the files') and
                where to run. The VQ is always float32. ``"auto"`` (what ``musefast.load`` passes):
                bfloat16 on a GPU and on a CPU that computes it natively (for models of 20M+
                parameters), else the files' dtype; a compat-sampler call then runs on a twin in
                the files' dtype, so it keeps the peer's tokens.
            text_encoder: a ready :class:`CLIPTextEncoder` to use instead of the folder's (the
                authors' inference.py swaps in the original LAION CLIP-H), used as given: build
                it with ``max_length=77`` to pad prompts as the peer does.
            sampler: default sampler, ``"fused"`` or ``"compat"``; backend: attention backend.
            quantize: ``"int8"``: the transformer's linears in int8 (CPU with VNNI;
                :mod:`musefast.cpu.int8`); with ``dtype="auto"`` the rest stays in the files'
                dtype, and a compat call runs on a float twin loaded once (the peer's tokens).
        """
        int8.check(quantize, device)
        folder = _resolve(folder_or_hub_id, variant, local_files_only)
        if not (folder / PIPELINE_INDEX).is_file():
            raise FileNotFoundError(f"{folder / PIPELINE_INDEX} not found: {folder} is not a pipeline folder")
        if not is_meissonic_transformer(folder / "transformer"):
            raise ValueError(f"{folder / 'transformer' / 'config.json'} is not a Meissonic transformer config")
        needed = ("transformer", "vqvae", "scheduler") + (() if text_encoder is not None else ("text_encoder",
                                                                                               "tokenizer"))
        for sub in needed:
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"Meissonic folder {folder} has no {sub}/ sub-folder")
        requested = dtype
        if dtype == "auto":
            weights_dtype, num_params = file_dtype(folder / "transformer", _present(variant, folder / "transformer"))
            on_gpu = device is not None and torch.device(device).type == "cuda"
            dtype = (weights_dtype if sampler == "compat" or quantize else torch.bfloat16 if on_gpu
                     else cpu_engine.resolve_dtype("auto", device, weights_dtype, num_params))
            dtype = None if dtype == weights_dtype else dtype
        transformer = MeissonicTransformer.from_pretrained(
            folder / "transformer", variant=_present(variant, folder / "transformer"), device=device, dtype=dtype,
            backend=backend)
        cpu_engine.apply_default(transformer)
        vqvae = load_vqmodel(folder / "vqvae", variant=_present(variant, folder / "vqvae"), device=device)
        if requested == "auto":
            cpu_conv.follow_auto(vqvae, dtype)
        if text_encoder is None:
            loaded = _load_clip(folder, variant, device, dtype)
            text_encoder = CLIPTextEncoder(loaded.model, loaded.tokenizer, max_length=TEXT_LENGTH)
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        pipe = cls(vqvae, text_encoder, transformer, mask_token_id=scheduler.get("mask_token_id"),
                   masking_schedule=scheduler.get("masking_schedule", "cosine"), sampler=sampler)
        if quantize or (requested == "auto" and dtype is not None):  # compat calls need the files' own dtype, in float
            pipe._compat_source = dict(folder_or_hub_id=folder, variant=variant, device=device, backend=backend)
        int8.quantize_pipeline(pipe, quantize)
        return pipe

    @property
    def image_size(self) -> int:
        """Default pixels per side: the peer's 1024."""
        return 1024

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt=None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds=None,
        encoder_hidden_states: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_encoder_hidden_states: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool | None = None,
        callback=None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict | None = None,
        micro_conditioning_aesthetic_score: float = 6,
        micro_conditioning_crop_coord: tuple[int, int] = (0, 0),
        temperature=(2, 0),
        *,
        image=None,
        mask_image=None,
        strength: float | None = None,
        seed: int | None = None,
        sampler: str | None = None,
        guidance_schedule: str = "constant",
        num_steps: int | None = None,
        backend: str | None = None,
        progress: bool = True,
        guidance_interval: tuple | None = None,
        cache=None,
    ):
        """Generate. Arguments are the peer ``Pipeline``'s (text to image: 48 steps, guidance 9,
        1024²), with ``image=`` its ``Img2ImgPipeline`` (``strength`` 0.5) and ``image=`` +
        ``mask_image=`` its ``InpaintPipeline`` (both: 12 steps, guidance 10), plus musefast's
        ``seed``, ``sampler`` (``"fused"`` / ``"compat"``), and for the fused sampler only
        ``guidance_schedule``, ``guidance_interval`` and ``cache`` (the step cache: None = exact,
        ``"fast"`` or a :class:`musefast.StepCache`, as :meth:`AmusedPipeline.__call__`; the text
        rows are recomputed on every cheap step, see :meth:`MeissonicTransformer.forward`), plus
        ``num_steps`` (= num_inference_steps, musefast's name), ``backend`` and ``progress``.
        ``output_type``: ``"pil"``, ``"np"``, ``"pt"``, or ``"latent"`` / ``"tokens"`` (the token
        grid). Returns as :meth:`AmusedPipeline.__call__`.
        """
        call_args = {k: v for k, v in locals().items() if k != "self"}
        if (sampler or self.sampler) == "compat" and self._compat_source is not None:
            return self._compat_pipeline()(**call_args)  # the files' own dtype: see from_pretrained
        if cross_attention_kwargs:
            raise ValueError("cross_attention_kwargs (LoRA scales, attention processors) are not supported")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        sampler = _check_sampler(self.sampler if sampler is None else sampler)
        if sampler == "compat" and guidance_schedule != "constant":
            raise ValueError("the compat sampler follows the peer: guidance_schedule must be 'constant'")
        if sampler == "compat" and (cache is not None or guidance_interval is not None):
            raise ValueError("the compat sampler follows the peer: cache and guidance_interval need sampler='fused'")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image=")
        if image is None and strength is not None:
            raise ValueError("strength applies to image-to-image and inpainting: pass image=")
        if image is not None and (latents is not None or height is not None or width is not None):
            raise ValueError("with image=, the size comes from the image: do not pass latents, height or width")
        default_steps, default_guidance = DEFAULTS["text2image" if image is None else "image"]
        if num_inference_steps is not None and num_steps is not None and num_inference_steps != num_steps:
            raise ValueError(f"num_inference_steps={num_inference_steps} and num_steps={num_steps} disagree")
        steps = next((n for n in (num_inference_steps, num_steps) if n is not None), default_steps)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        guidance_scale = default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = uses_guidance(check_guidance_scale(guidance_scale))  # diffusers: <= 1 is no guidance
        progress = self._progress(progress)  # set_progress_bar_config(disable=True) silences it, as every pipeline
        pooled, hidden, B = self.encode_text(
            prompt, negative_prompt, prompt_embeds=prompt_embeds, encoder_hidden_states=encoder_hidden_states,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_encoder_hidden_states=negative_encoder_hidden_states,
            num_images_per_prompt=num_images_per_prompt, use_cfg=use_cfg, exact_batching=sampler == "compat")
        tokens, start, ratio, height, width, compat, seed, generator = self._initial_tokens(
            B=B, steps=steps, sampler=sampler, temperature=temperature, image=image, mask_image=mask_image,
            latents=latents, height=height, width=width, strength=strength,
            num_images_per_prompt=num_images_per_prompt, seed=seed, generator=generator)
        self._guidance_scale, self._num_timesteps = guidance_scale, steps - start
        hook = self._step_hook(callback, callback_steps, None, None, start)

        micro = torch.tensor([width, height, *micro_conditioning_crop_coord, micro_conditioning_aesthetic_score],
                             device=self.device, dtype=hidden.dtype)
        context = self.transformer.prepare_context(hidden, pooled, micro)
        step = [start]  # both samplers call the model once per step (the step cache too), in order: count the calls

        def model(tokens: torch.Tensor, *, context, **cache_kw):
            """The transformer at the step's timestep (the scheduler's run T-1 ... 0) -> channels-last
            logits (B, h, w, K), or the rows' (B, M, K) on a step-cache call with ``rows``."""
            timestep = torch.tensor([steps - 1 - step[0]], device=self.device)
            step[0] += 1
            out = self.transformer(tokens, context=context, timestep=timestep, **cache_kw)
            return out if cache_kw.get("rows") is not None else out.permute(0, 2, 3, 1)  # a view: channels-last memory

        if compat is not None:
            def logits_of(model_in: torch.Tensor) -> torch.Tensor:
                """(B, h, w) -> guided (B, h·w, K) logits, combined as the peer does."""
                out = model(torch.cat([model_in, model_in]) if use_cfg else model_in, context=context)
                out = out.reshape(out.shape[0], -1, out.shape[-1])
                if not use_cfg:
                    return out
                uncond, cond = out.chunk(2)
                return uncond + guidance_scale * (cond - uncond)

            tokens = self._run_compat(compat, logits_of, tokens, start, ratio, generator, hook, progress)
        else:  # negatives come first in a CFG batch, as in the peer
            forward = (GuidedForward(model, batch_slice(context, slice(B, 2 * B)), context, uncond_first=True)
                       if use_cfg else GuidedForward(model, context))
            tokens = self._run_fused(forward, tokens, steps, start, ratio, use_cfg, guidance_scale,
                                     guidance_schedule, temperature, mask_image is not None, seed, backend, hook,
                                     progress, guidance_interval, cache)
        return self._output(tokens, output_type, return_dict)


__all__ = ["MeissonicPipeline"]
