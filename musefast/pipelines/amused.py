"""``AmusedPipeline``: aMUSEd (``amused/amused-256``, ``amused/amused-512``) on musefast.

Loads a diffusers aMUSEd folder (``model_index.json``, ``transformer/``, ``vqvae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) and takes the call arguments of diffusers'
``AmusedPipeline`` (text to image), ``AmusedImg2ImgPipeline`` (``image=``, ``strength=``) and
``AmusedInpaintPipeline`` (``image=``, ``mask_image=``), with their defaults: 12 steps,
guidance 10, choice temperature (2, 0), micro-conditioning (width, height, crop, aesthetic
score 6), negative prompts, a ``generator``, ``output_type``.

Two samplers:

* ``"fused"`` (default): :class:`musefast.sampling.MaskGitSampler` with the ``amused`` preset —
  one fused ``cfg_sample_remask`` per step; the same distribution as diffusers, not the same
  draws (a Philox seed: ``seed=``, or one drawn from ``generator``).
* ``"compat"``: :class:`musefast.compat.amused_scheduler.AmusedCompatSampler`, which consumes
  the ``generator`` exactly as diffusers does: the same seed gives the same tokens.
  ``seed=s`` means ``generator=torch.Generator("cpu").manual_seed(s)``.

Either way the text K/V and the modulations of every layer are computed once per call
(:meth:`UVit2D.prepare_context`), both CFG branches run in one batched forward, and the VQ
decodes in float32 (in bf16 where ``dtype="auto"`` put the transformer in bf16 on a CPU). Batch order follows diffusers: with several prompts and
``num_images_per_prompt`` > 1 the batch is the prompts repeated as a whole
(p0, p1, p0, p1, ...).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from musefast.compat.amused_scheduler import (
    MASKING_SCHEDULES,
    AmusedCompatSampler,
    choice_temperatures,
)
from musefast.cpu import conv as cpu_conv, int8
from musefast.models.text import CLIPTextEncoder, TextEmbeddings
from musefast.models.uvit import UVit2D
from musefast.models.vqgan import VQGAN
from musefast.models.vqmodel import load_vqmodel
from musefast.pipelines.images import AnyPixelMask, format_output, to_mask, to_tensor, token_mask
from musefast.pipelines.loading import resolve_dtype, runnable
from musefast.pipelines.amused_save import save_amused
from musefast.pipelines.callbacks import check_latents, grid_reporter, step_hook
from musefast.pipelines.diffusers_api import (  # noqa: F401 (AmusedPipelineOutput: re-exported)
    LOAD_LOGGER,
    AmusedPipelineOutput,
    DiffusersPipelineAPI,
    pipeline_output,
)
from musefast.pipelines.options import diffusers_dtype, resolve_seed, to_arguments
from musefast.pipelines.shared import HUB_ID, as_list, file_dtype, negatives_for
from musefast.pipelines.peer_components import (
    AmusedSchedulerConfig,
    convert_components,
    convert_transformer,
    is_peer_module,
)
from musefast.generation.adapters import Stage
from musefast.generation.pipeline_call import decode_stage
from musefast.sampling import GuidedForward, MaskGitSampler, check_guidance_scale, mask_ratio, uses_guidance
from musefast.sampling.cache import batch_slice

PIPELINE_INDEX = "model_index.json"
AMUSED_CLASSES = ("AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline")
SAMPLERS = ("fused", "compat")
OUTPUT_TYPES = ("pil", "np", "pt", "latent", "tokens")
MICRO_CROP, MICRO_AESTHETIC = (0, 0), 6  # diffusers' micro-conditioning defaults


class AmusedPipeline(DiffusersPipelineAPI):
    """aMUSEd text-to-image, image-to-image and inpainting.

    Built from musefast's components (``AmusedPipeline(vqvae, text_encoder, transformer)``) or,
    by keyword, from diffusers' own (``AmusedPipeline(vqvae=VQModel, tokenizer=CLIPTokenizer,
    text_encoder=CLIPTextModelWithProjection, transformer=UVit2DModel, scheduler=AmusedScheduler)``,
    e.g. ``**diffusers_pipe.components``): those are converted once, here. A pipeline built from
    diffusers' objects also follows diffusers' return convention (``return_dict`` defaults to
    True: ``pipe(...)[0]`` is the images) and its ``to()`` moves those objects too while their
    owner keeps them; one built from musefast's components or loaded returns the images.

    Args:
        vqvae: the VQ tokenizer (:func:`musefast.models.vqmodel.load_vqmodel`), kept in float32;
            or diffusers' ``VQModel``.
        text_encoder: a :class:`CLIPTextEncoder` (penultimate hidden states + projected pooled
            embedding), or transformers' ``CLIPTextModelWithProjection`` with ``tokenizer=``, or
            None if you always pass prompt embeddings.
        transformer: the :class:`UVit2D`, or diffusers' ``UVit2DModel``.
        scheduler: diffusers' ``AmusedScheduler`` (its mask id and masking schedule are used).
        tokenizer: the CLIP tokenizer, with a transformers ``text_encoder``.
        mask_token_id: the [MASK] id (default: the scheduler's, else the transformer's ``vocab_size − 1``).
        masking_schedule: the scheduler's schedule for text-to-image and image-to-image
            (inpainting always uses ``"linear"``, as diffusers' inpaint pipeline); default: the
            scheduler's, else ``"cosine"``.
        sampler: default sampler, ``"fused"`` or ``"compat"``.
    """

    _component_names = ("vqvae", "tokenizer", "text_encoder", "transformer", "scheduler")
    engine_family = "amused"  # the generation engine's adapter (musefast.generation.adapters)
    _peer = "diffusers"  # whose sampler the compat sampler follows (error messages)
    DEFAULTS = {"text2image": (12, 10.0), "image": (12, 10.0)}  # (steps, guidance) of diffusers' pipelines
    model_cpu_offload_seq = "text_encoder->transformer->vqvae"

    def __init__(self, vqvae: VQGAN | None = None, text_encoder: CLIPTextEncoder | None = None,
                 transformer: UVit2D | None = None, scheduler=None, *, tokenizer=None,
                 mask_token_id: int | None = None, masking_schedule: str | None = None, sampler: str = "fused"):
        c = convert_components(vqvae, text_encoder, transformer, tokenizer, scheduler, transformer_class="UVit2DModel",
                               is_peer_transformer=lambda m: is_peer_module(m, "UVit2DModel"),
                               convert_peer_transformer=convert_transformer)
        vqvae, text_encoder, transformer = c.vqvae, c.text_encoder, c.transformer
        mask_token_id, masking_schedule = self._take_peer_settings(c, mask_token_id, masking_schedule)
        cfg = transformer.config
        # diffusers accepts a VQ codebook larger than the transformer's (its img2img test model):
        # the transformer must embed every id the VQ encodes, and the VQ decode every id it predicts
        if not cfg.codebook_size <= vqvae.config.codebook_size <= cfg.vocab_size:
            raise ValueError(f"vqvae codebook ({vqvae.config.codebook_size}) must lie between the transformer's "
                             f"codebook_size ({cfg.codebook_size}) and vocab_size ({cfg.vocab_size})")
        if text_encoder is not None:
            if text_encoder.hidden_size != cfg.encoder_hidden_size:
                raise ValueError(f"text encoder width {text_encoder.hidden_size} != transformer encoder_hidden_size "
                                 f"{cfg.encoder_hidden_size}")
            if text_encoder.pooled_size != cfg.cond_embed_dim:
                raise ValueError(f"text encoder projection {text_encoder.pooled_size} != transformer cond_embed_dim "
                                 f"{cfg.cond_embed_dim}")
        self.vqvae, self.text_encoder, self.transformer = vqvae.float().eval(), text_encoder, transformer.eval()
        self.mask_token_id = cfg.mask_token_id if mask_token_id is None else int(mask_token_id)
        lowest = cfg.codebook_size if cfg.vocab_size > cfg.codebook_size else 0  # see UVit2DConfig's check
        if not lowest <= self.mask_token_id < cfg.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} must lie in [codebook_size, vocab_size) = "
                             f"[{cfg.codebook_size}, {cfg.vocab_size})")
        if masking_schedule not in MASKING_SCHEDULES:
            raise ValueError(f"masking_schedule must be one of {MASKING_SCHEDULES}, got {masking_schedule!r}")
        self.masking_schedule = masking_schedule
        self.sampler = _check_sampler(sampler)
        self._compat_source: dict | None = None  # set by from_pretrained when dtype="auto" changed the dtype
        self._compat_twin: AmusedPipeline | None = None

    def _take_peer_settings(self, converted, mask_token_id, masking_schedule):
        """Keep what a pipeline built from the peer's objects needs; -> (mask id, masking schedule)
        with the scheduler's settings where the caller gave none."""
        self._peer_modules = converted.peer_modules
        self._return_dict_default = True if converted.from_peer else None
        settings = converted.scheduler
        if settings is not None:
            mask_token_id = settings.mask_token_id if mask_token_id is None else mask_token_id
            masking_schedule = masking_schedule or settings.masking_schedule
        return mask_token_id, masking_schedule or "cosine"

    @property
    def scheduler(self) -> AmusedSchedulerConfig:
        """The decoding schedule's settings (diffusers' ``AmusedScheduler`` config)."""
        return AmusedSchedulerConfig(self.mask_token_id, self.masking_schedule)

    @property
    def tokenizer(self):
        return None if self.text_encoder is None else self.text_encoder.tokenizer

    def save_pretrained(self, save_directory, *, variant: str | None = None, safe_serialization: bool = True,
                        **kwargs) -> None:
        """Save in the peer's folder layout — diffusers' for aMUSEd, the Meissonic repository's for
        Meissonic — loadable by musefast's and the peer's ``from_pretrained``.
        Weights are always written as safetensors (``safe_serialization`` is accepted for
        diffusers compatibility); ``variant`` names the weight files (``*.fp16.safetensors``)."""
        unknown = sorted(set(kwargs) - {"max_shard_size", "push_to_hub"})
        if unknown or kwargs.get("push_to_hub"):
            raise TypeError(f"save_pretrained() does not take {unknown or ['push_to_hub=True']}: musefast never "
                            "uploads; save to a folder and upload it with huggingface_hub")
        self._write_folder(save_directory, variant=variant)

    def _write_folder(self, folder, *, variant: str | None = None) -> None:
        save_amused(self, folder, variant=variant)

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder_or_hub_id: str | os.PathLike, *, variant: str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | str | None = "auto",
                        sampler: str = "fused", backend: str | None = None,
                        local_files_only: bool = False, quantize: str | None = None,
                        torch_dtype: torch.dtype | dict | None = None) -> "AmusedPipeline":
        """Load a diffusers aMUSEd folder, or a hub id (``amused/amused-256``) — downloaded with
        huggingface_hub only when it is not a local folder.

        Args:
            variant: weight variant (``"fp16"``): its files are used where present (only
                they are downloaded for a hub id).
            device, dtype: where to run and the transformer's / text encoder's dtype. The VQ's
                weights are always float32. ``None``: the files' dtype. ``"auto"`` (default): on a
                CPU with native bf16 (AVX512-BF16 or AMX) float32 weights run in bfloat16 and the
                VQ decoder computes in bf16 (:func:`musefast.cpu.conv.follow_auto`), else as stored —
                except for the compat sampler, which promises diffusers' tokens for a seed and so
                runs in the weights' own dtype: with ``sampler="compat"`` here the pipeline loads
                in that dtype, and a ``sampler="compat"`` call on a pipeline that "auto" put in
                bf16 runs on a twin loaded once in the weights' dtype. Pass a dtype to choose.
            sampler: default sampler (``"fused"`` or ``"compat"``).
            backend: attention backend of the transformer (None = best available).
            torch_dtype: diffusers' name for ``dtype``; or, as diffusers allows, a dict of
                dtypes by component name with an optional ``"default"``
                (``{"transformer": torch.bfloat16, "default": torch.float16}``) — only there may
                the VQ get a half dtype (it still decodes in float32).
            quantize: ``"int8"``: the transformer's linears in int8 (CPU with VNNI; close to the
                float logits, not equal: :mod:`musefast.cpu.int8`); with ``dtype="auto"`` the rest
                of the transformer stays in the weights' dtype. A compat call on a quantized
                pipeline runs on a float twin loaded once, so it keeps diffusers' tokens.
        """
        int8.check(quantize, device)
        dtypes = torch_dtype if isinstance(torch_dtype, dict) else None
        dtype = diffusers_dtype(dtype, None if dtypes is not None else torch_dtype)
        folder = _resolve(folder_or_hub_id, variant, local_files_only)
        index_file = folder / PIPELINE_INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: {folder} is not a diffusers pipeline folder")
        index = json.loads(index_file.read_text())
        if index.get("_class_name") not in AMUSED_CLASSES:
            raise ValueError(f"{index_file}: _class_name={index.get('_class_name')!r} is not an aMUSEd pipeline "
                             f"({', '.join(AMUSED_CLASSES)})")
        for sub in ("transformer", "vqvae", "text_encoder", "tokenizer", "scheduler"):
            if not (folder / sub).is_dir():
                raise FileNotFoundError(f"aMUSEd folder {folder} has no {sub}/ sub-folder")
        sampler = _check_sampler(sampler)
        _check_variant(folder, variant)
        if dtypes is not None:
            return cls._from_pretrained_per_component(folder, dtypes, variant=variant, device=device, sampler=sampler,
                                                      backend=backend)
        weights_dtype, num_params = file_dtype(folder / "transformer", _present(variant, folder / "transformer"))
        run_dtype = dtype
        if dtype == "auto":  # int8 keeps the rest in the weights' dtype: closer logits, and no slower (README)
            run_dtype = (weights_dtype if sampler == "compat" or quantize
                         else resolve_dtype(dtype, device, weights_dtype, num_params))
        transformer = runnable(UVit2D.from_pretrained(
            folder / "transformer", variant=_present(variant, folder / "transformer"), device=device, dtype=run_dtype,
            backend=backend), quantize=quantize)
        vqvae = runnable(load_vqmodel(folder / "vqvae", variant=_present(variant, folder / "vqvae"), device=device))
        if dtype == "auto":
            cpu_conv.follow_auto(vqvae, run_dtype)
        text_encoder = _load_clip(folder, variant, device, None if dtype == "auto" and run_dtype == weights_dtype
                                  else run_dtype)
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise FileNotFoundError(f"{scheduler_file} not found")
        scheduler = json.loads(scheduler_file.read_text())
        pipe = cls(vqvae, text_encoder, transformer, mask_token_id=scheduler.get("mask_token_id"),
                   masking_schedule=scheduler.get("masking_schedule", "cosine"), sampler=sampler)
        _log_loaded(pipe, folder)
        if quantize or (run_dtype != weights_dtype and dtype == "auto"):  # compat calls need the weights' own dtype, in float
            pipe._compat_source = dict(folder_or_hub_id=folder, variant=variant, device=device, backend=backend)
        return pipe

    @classmethod
    def _from_pretrained_per_component(cls, folder: Path, dtypes: dict, *, variant, device, sampler, backend):
        """``torch_dtype={"transformer": ..., "default": ...}``: each component in its dtype
        (those named by neither key keep their files' dtype; the VQ decodes in float32 anyway)."""
        unknown = sorted(set(dtypes) - {"default", "transformer", "text_encoder", "vqvae"})
        if unknown:
            raise ValueError(f"torch_dtype dict: unknown component(s) {unknown}; use transformer, text_encoder, "
                             "vqvae or default")
        pick = lambda name: dtypes.get(name, dtypes.get("default"))  # noqa: E731
        transformer = runnable(UVit2D.from_pretrained(
            folder / "transformer", variant=_present(variant, folder / "transformer"), device=device,
            dtype=pick("transformer"), backend=backend))
        vqvae = runnable(load_vqmodel(folder / "vqvae", variant=_present(variant, folder / "vqvae"), device=device))
        if pick("vqvae") is not None:
            vqvae.to(dtype=pick("vqvae"))
        text_encoder = _load_clip(folder, variant, device, pick("text_encoder"))
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        pipe = cls(vqvae, text_encoder, transformer, mask_token_id=scheduler.get("mask_token_id"),
                   masking_schedule=scheduler.get("masking_schedule", "cosine"), sampler=sampler)
        if pick("vqvae") is not None:
            pipe.vqvae.to(dtype=pick("vqvae"))  # the constructor keeps a VQ in float32 unless asked here
        _log_loaded(pipe, folder)
        return pipe

    def _initial_tokens(self, *, B, steps, sampler, temperature, image, mask_image, latents, height, width,
                        strength, num_images_per_prompt, seed, generator):
        """What both samplers start from, for text-to-image (all masked, or ``latents``),
        image-to-image (``image``: noised as the sampler's scheduler does) and inpainting
        (``mask_image``). Returns (tokens (B, h, w), first step, starting mask ratio or None,
        height, width, the compat sampler or None, seed, generator)."""
        compat = AmusedCompatSampler(steps, mask_token_id=self.mask_token_id, temperature=temperature,
                                     masking_schedule="linear" if mask_image is not None else self.masking_schedule,
                                     device=self.device) if sampler == "compat" else None
        if sampler == "fused":
            seed = resolve_seed(seed, generator)  # a list (of seeds or generators): one seed per image
            if isinstance(seed, list) and len(seed) != B:
                raise ValueError(f"{len(seed)} seeds or generators for {B} images: pass one per image "
                                 f"(prompts x num_images_per_prompt), or one")
        else:
            if isinstance(seed, (list, tuple)) or isinstance(generator, (list, tuple)):
                raise ValueError("the compat sampler consumes one generator, as diffusers' aMUSEd: pass one seed or "
                                 "generator, or sampler='fused' for one per image")
            if seed is not None:
                if generator is not None:
                    raise ValueError("pass seed or generator, not both")
                generator = torch.Generator().manual_seed(resolve_seed(seed))

        start, ratio = 0, None
        if image is None:
            f = self.vae_scale_factor
            height = self.image_size if height is None else height
            width = self.image_size if width is None else width
            grid = (height // f, width // f)
            if latents is None:
                tokens = torch.full((B, *grid), self.mask_token_id, dtype=torch.long, device=self.device)
            else:
                tokens = check_latents(latents, (B, *grid), self.device)
        else:
            pixels = self.preprocess(image)
            height, width = pixels.shape[-2:]
            tokens = self.vqvae.encode(pixels.to(self.vqvae.device)).to(self.device)
            strength = (1.0 if mask_image is not None else 0.5) if strength is None else strength
            if not 0 < strength <= 1:
                raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
            start = steps - int(steps * strength)
            if start == steps:
                raise ValueError(f"strength={strength} runs int({steps} x {strength}) = 0 of the {steps} steps: "
                                 "raise strength or num_inference_steps")
            if mask_image is None and isinstance(seed, list):  # per-image seeds: each image noised by its own
                tokens = _match_batch(tokens, B // num_images_per_prompt).repeat(num_images_per_prompt, 1, 1)
                tokens = torch.cat([self._fused_noise(t[None], start, steps, s) for t, s in zip(tokens, seed)])
            elif mask_image is None:
                tokens = (compat.add_noise(tokens, start, generator) if compat
                          else self._fused_noise(tokens, start, steps, seed))
            else:
                masked = self._token_mask(mask_image, tokens.shape)
                tokens = tokens.masked_fill(masked, self.mask_token_id)
                ratio = masked.sum() / tokens.numel()
            if tokens.shape[0] != B:
                tokens = _match_batch(tokens, B // num_images_per_prompt).repeat(num_images_per_prompt, 1, 1)
        return tokens, start, ratio, height, width, compat, seed, generator

    def _compat_pipeline(self) -> "AmusedPipeline":
        """The twin a compat call runs on when ``dtype="auto"`` changed this pipeline's dtype:
        loaded once from the same folder in the weights' own dtype."""
        if self._compat_twin is None:
            self._compat_twin = type(self).from_pretrained(**self._compat_source, dtype=None, sampler="compat",
                                                           local_files_only=True)
        return self._compat_twin

    def to(self, *args, device=None, dtype=None) -> "AmusedPipeline":
        """Move every component to ``device``; ``dtype`` applies to the transformer and the text
        encoder (the VQ stays float32). Positional or keyword, as diffusers: ``to("cuda")``,
        ``to(torch.float16)``, ``to("cuda", torch.float16)``, ``to(device=..., dtype=...)``."""
        device, dtype = to_arguments(args, device, dtype)
        self._peer_modules.to(device=device, dtype=dtype)
        self.transformer.to(device=device, dtype=dtype)
        if self.text_encoder is not None:
            self.text_encoder.to(device=device, dtype=dtype)
        self.vqvae.to(device=device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.vqvae.downsampling_factor

    @property
    def image_size(self) -> int:
        """Default pixels per side: the transformer's ``sample_size`` × the VQ factor."""
        return self.transformer.config.sample_size * self.vae_scale_factor

    # -- text ------------------------------------------------------------------------------

    def _text_encoder(self) -> CLIPTextEncoder:
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds and encoder_hidden_states")
        return self.text_encoder

    def __getattr__(self, name):
        # musefast's earlier name of encode_text, for instances only: a class attribute named
        # encode_prompt would make diffusers' pipeline tests expect their newer encode_prompt contract
        if name == "encode_prompt":
            import warnings

            warnings.warn("AmusedPipeline.encode_prompt is now encode_text", DeprecationWarning, stacklevel=2)
            return self.encode_text
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def encode_text(self, prompt=None, negative_prompt=None, *, prompt_embeds=None, encoder_hidden_states=None,
                      negative_prompt_embeds=None, negative_encoder_hidden_states=None, num_images_per_prompt=1,
                      use_cfg=True, exact_batching=False) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> (pooled (M, P), hidden (M, L, E), batch B): the transformer batch M = 2B with CFG
        (negatives first, as diffusers) else B; B = prompts × num_images_per_prompt, the prompts
        repeated as a whole. ``exact_batching``: encode the negatives as diffusers does (one
        batch of len(prompt) entries) rather than through the prompt cache."""
        pooled, hidden = _embeddings(prompt_embeds, encoder_hidden_states, "prompt_embeds", "encoder_hidden_states")
        if pooled is None:
            if prompt is None:
                raise ValueError("pass prompt, or prompt_embeds and encoder_hidden_states")
            emb = self._text_encoder().encode(as_list(prompt, "prompt"))
            pooled, hidden = emb.pooled, emb.hidden
        elif prompt is not None:
            raise ValueError("pass only one of prompt and prompt_embeds")
        n = pooled.shape[0]
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        pooled, hidden = pooled.repeat(num_images_per_prompt, 1), hidden.repeat(num_images_per_prompt, 1, 1)
        if use_cfg:
            neg_pooled, neg_hidden = _embeddings(negative_prompt_embeds, negative_encoder_hidden_states,
                                                 "negative_prompt_embeds", "negative_encoder_hidden_states")
            if neg_pooled is None:
                negatives = negatives_for(negative_prompt, n)
                encoder = self._text_encoder()
                emb = encoder.encode(negatives) if exact_batching else encoder.encode_cached(negatives)
                neg_pooled, neg_hidden = emb.pooled, emb.hidden
            if neg_pooled.shape[0] == 1 and n > 1:
                neg_pooled, neg_hidden = neg_pooled.expand(n, -1), neg_hidden.expand(n, -1, -1)
            if neg_pooled.shape[0] != n or neg_hidden.shape[1:] != hidden.shape[1:]:
                raise ValueError(f"negative embeddings {tuple(neg_hidden.shape)} do not match the prompts' "
                                 f"{(n,) + tuple(hidden.shape[1:])}")
            neg_pooled = neg_pooled.repeat(num_images_per_prompt, 1)
            neg_hidden = neg_hidden.repeat(num_images_per_prompt, 1, 1)
            pooled, hidden = torch.cat([neg_pooled, pooled]), torch.cat([neg_hidden, hidden])
        return pooled.to(self.device), hidden.to(self.device), n * num_images_per_prompt

    # -- images <-> tokens -----------------------------------------------------------------

    def preprocess(self, image) -> torch.Tensor:
        """Image(s) -> float (B, 3, H, W) in [0, 1] on the pipeline's device, H and W rounded
        down to multiples of the VQ factor as diffusers' image processor does (PIL: Lanczos
        resize; arrays and tensors: nearest)."""
        f = self.vae_scale_factor
        images = image if isinstance(image, (list, tuple)) else [image]
        if images and all(isinstance(im, Image.Image) for im in images):
            w, h = (x - x % f for x in images[0].size)
            images = [im.resize((w, h), resample=Image.Resampling.LANCZOS) for im in images]
            return to_tensor(images, name="image").to(self.device)
        t = to_tensor(image, name="image")
        h, w = (x - x % f for x in t.shape[-2:])
        if (h, w) != tuple(t.shape[-2:]):
            t = F.interpolate(t, size=(h, w))
        return t.to(self.device)

    @torch.no_grad()
    def encode(self, image) -> torch.Tensor:
        """Image(s) -> tokens (B, h, w) int64."""
        return self.vqvae.encode(self.preprocess(image).to(self.vqvae.device))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) -> images (B, 3, H, W) float32 in [0, 1] (decoded in float32)."""
        return self.vqvae.decode(tokens.to(self.vqvae.device))

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 10.0,
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
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        """Generate. Text-to-image by default; ``image=`` gives image-to-image (``strength``
        default 0.5: the last ``int(T · strength)`` steps run); ``image=`` + ``mask_image=``
        gives inpainting (white = repaint; ``strength`` default 1.0; the mask is resized to the
        token grid and thresholded at 0.5, as diffusers — see :meth:`inpaint` for musefast's
        any-pixel rule).

        Arguments are diffusers', plus: ``seed`` (instead of a generator), ``sampler``
        (``"fused"`` / ``"compat"``; default: the pipeline's), ``guidance_schedule`` (fused
        only: ``constant``, ``linear``, ``cosine``, ``cosine_decay``), ``guidance_interval``
        (fused only: guidance on the steps in that fraction (a, b) of the decoding, the
        conditional branch alone elsewhere), ``cache`` (fused only: the step cache, None /
        ``"fast"`` / a :class:`musefast.StepCache`; inpainting keeps the unmasked tokens exactly
        with it too), ``num_steps`` (= num_inference_steps, default 12), ``backend`` (of the
        fused step), ``progress``. ``output_type``: ``"pil"``,
        ``"np"``, ``"pt"``, or ``"latent"`` / ``"tokens"`` (the token grid). Returns the images
        — for ``"pil"`` a list that also answers ``.images`` — or diffusers' output object with
        ``return_dict=True``, a 1-tuple with ``return_dict=False`` (every kind answers ``.images``);
        a pipeline built from diffusers' objects defaults to ``return_dict=True``, as diffusers.
        ``callback_on_step_end(pipe, step, timestep, {"latents": tokens})`` runs after every
        step, as diffusers' newer pipelines: the tokens it returns under ``"latents"`` replace
        the current ones, and it may change ``pipe._guidance_scale`` (read back as
        ``pipe.guidance_scale``; the decoding keeps the scale it started with).
        """
        call_args = {k: v for k, v in locals().items() if k != "self"}
        if (sampler or self.sampler) == "compat" and self._compat_source is not None:
            return self._compat_pipeline()(**call_args)  # the weights' own dtype: see from_pretrained
        if return_dict is None:
            call_args["return_dict"] = self._return_dict_default
        with self._offloaded():
            return self._generate(**call_args)

    def _generate(self, prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                  num_images_per_prompt, generator, latents, prompt_embeds, encoder_hidden_states,
                  negative_prompt_embeds, negative_encoder_hidden_states, output_type, return_dict, callback,
                  callback_steps, cross_attention_kwargs, micro_conditioning_aesthetic_score,
                  micro_conditioning_crop_coord, temperature, image, mask_image, strength, seed, sampler,
                  guidance_schedule, num_steps, backend, progress, guidance_interval, cache, callback_on_step_end,
                  callback_on_step_end_tensor_inputs):
        if cross_attention_kwargs:
            raise ValueError("cross_attention_kwargs (LoRA scales, attention processors) are not supported")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        sampler = _check_sampler(self.sampler if sampler is None else sampler)
        if sampler == "compat" and guidance_schedule != "constant":
            raise ValueError(f"the compat sampler follows {self._peer}: guidance_schedule must be 'constant'")
        if sampler == "compat" and (cache is not None or guidance_interval is not None):
            raise ValueError(f"the compat sampler follows {self._peer}: cache and guidance_interval need "
                             "sampler='fused'")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs image=")
        if image is None and strength is not None:
            raise ValueError("strength applies to image-to-image and inpainting: pass image=")
        if image is not None and (latents is not None or height is not None or width is not None):
            raise ValueError("with image=, the size comes from the image: do not pass latents, height or width")
        default_steps, default_guidance = self.DEFAULTS["text2image" if image is None else "image"]
        steps = _steps(num_inference_steps, num_steps, default_steps)
        guidance_scale = default_guidance if guidance_scale is None else guidance_scale
        use_cfg = uses_guidance(check_guidance_scale(guidance_scale))  # diffusers: no guidance at all for g <= 1
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
        hook = step_hook(self, callback, callback_steps, callback_on_step_end, callback_on_step_end_tensor_inputs,
                         start)
        context = self._context(hidden, pooled, height, width, micro_conditioning_crop_coord,
                                micro_conditioning_aesthetic_score)
        if compat is not None:
            tokens = self._run_compat(compat, self._compat_logits(context, use_cfg, guidance_scale, steps, start),
                                      tokens, start, ratio, generator, hook, progress)
        else:
            stage = self._stage(context, tokens, steps=steps, start=start, ratio=ratio, use_cfg=use_cfg,
                                guidance_scale=guidance_scale, guidance_schedule=guidance_schedule,
                                guidance_interval=guidance_interval, temperature=temperature,
                                inpaint=mask_image is not None, seed=seed, backend=backend, cache=cache)
            tokens = self._run_fused(stage, hook, backend, progress)
        return self._output(tokens, output_type, return_dict)

    def inpaint(self, image, mask, prompt=None, **kwargs):
        """musefast's inpainting rule: a token is repainted if any pixel of its patch
        is white (nonzero) in ``mask``; every other token of ``encode(image)`` is kept exactly.
        Other arguments as :meth:`__call__`."""
        if "mask_image" in kwargs:
            raise TypeError("inpaint() takes the mask as its second argument, not mask_image=")
        return self(prompt, image=image, mask_image=AnyPixelMask(mask), **kwargs)

    # -- pieces ----------------------------------------------------------------------------

    def _token_mask(self, mask_image, shape) -> torch.Tensor:
        """bool (B, h, w) tokens to repaint."""
        B, h, w = shape
        if isinstance(mask_image, AnyPixelMask):
            pixels = to_mask(mask_image.mask)
            f = self.vae_scale_factor
            if tuple(pixels.shape[-2:]) != (h * f, w * f):
                raise ValueError(f"mask size {tuple(pixels.shape[-2:])} must equal the image size {(h * f, w * f)}")
            masked = token_mask(pixels, f)
        else:
            masked = diffusers_token_mask(mask_image, h, w)
        if masked.shape[0] not in (1, B):
            raise ValueError(f"mask batch {masked.shape[0]} must be 1 or the image batch {B}")
        return masked.expand(B, h, w).to(self.device)

    def _fused_noise(self, tokens: torch.Tensor, start: int, steps: int, seed: int) -> torch.Tensor:
        """Image-to-image start of the fused sampler: each token is masked with probability
        γ(start / T) — the state the schedule reaches before step ``start`` (1 at start 0) —
        drawn from a CPU generator seeded with ``seed``."""
        ratio = mask_ratio(self.masking_schedule, start / steps)
        chosen = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(seed)) < ratio
        return tokens.masked_fill(chosen.to(tokens.device), self.mask_token_id)

    def _run_compat(self, compat: AmusedCompatSampler, logits_of, tokens, start, ratio, generator, hook,
                    progress) -> torch.Tensor:
        for i in _progress(range(start, len(compat.timesteps)), progress):
            tokens = compat.step(logits_of(tokens), i, tokens, starting_mask_ratio=1.0 if ratio is None else ratio,
                                 generator=generator)
            replaced = None if hook is None else hook(i, compat.timesteps[i], tokens)
            if replaced is not None:
                tokens = check_latents(replaced, tuple(tokens.shape), tokens.device)
        return tokens

    def _context(self, hidden, pooled, height, width, crop=MICRO_CROP, aesthetic=MICRO_AESTHETIC):
        """The transformer's prepared context of a call's rows (text + micro-conditioning)."""
        micro = torch.tensor([width, height, *crop, aesthetic], device=self.device, dtype=hidden.dtype)
        return self.transformer.prepare_context(hidden, pooled, micro)

    def _compat_logits(self, context, use_cfg: bool, guidance_scale: float, steps: int, start: int):
        """(B, h, w) -> guided (B, h·w, K) logits, combined as the peer does (the compat sampler's
        model: both branches every step)."""
        model = self._timed_model(steps, start)

        def logits_of(model_in: torch.Tensor) -> torch.Tensor:
            out = model(torch.cat([model_in, model_in]) if use_cfg else model_in, context=context)
            out = out.reshape(out.shape[0], -1, out.shape[-1])
            if not use_cfg:
                return out
            uncond, cond = out.chunk(2)
            return uncond + guidance_scale * (cond - uncond)

        return logits_of

    def _timed_model(self, steps: int, start: int):
        """The compat sampler's transformer call (aMUSEd's takes no timestep)."""
        return self.transformer

    def _stage(self, context, tokens, *, steps, start, ratio, use_cfg, guidance_scale, guidance_schedule="constant",
               guidance_interval=None, temperature=(2, 0), inpaint=False, seed=0, backend=None, cache=None,
               sampling_temperature=None) -> Stage:
        """The engine's job for a call's rows ``tokens`` (B, h, w): contexts (negatives first in
        a guided batch, as diffusers), the fused sampler's preset, the first step. ``temperature``
        is diffusers' (the confidence noise, start and end); ``sampling_temperature`` the
        tokens' (None: the preset's, 1)."""
        B = tokens.shape[0]
        forward = (GuidedForward(self.transformer, batch_slice(context, slice(B, 2 * B)), context, uncond_first=True)
                   if use_cfg else GuidedForward(self.transformer, context))
        temps = choice_temperatures(steps, temperature)
        sampler = MaskGitSampler(
            "amused", backend=backend, progress=False, num_steps=steps, cache=cache,
            guidance_scale=float(guidance_scale) if use_cfg else 1.0, guidance_schedule=guidance_schedule,
            guidance_interval=guidance_interval, choice_temperature=(float(temps[0]), float(temps[-1])),
            mask_schedule="linear" if inpaint else self.masking_schedule,
            **({} if sampling_temperature is None else {"temperature": sampling_temperature}))
        return Stage("base", forward, sampler, tokens, tokens == self.mask_token_id, tuple(tokens.shape),
                     tuple(tokens.shape[1:]), self.mask_token_id, seed, step=start,
                     starting_mask_ratio=1.0 if ratio is None else ratio)

    def _run_fused(self, stage: Stage, hook, backend, progress) -> torch.Tensor:
        """Decode ``stage`` on the generation engine (the code ``musefast batch`` and the server run)."""
        report = None if hook is None else grid_reporter(hook, offset=0, num_steps=stage.num_steps, grid=stage.grid,
                                                         mask_token_id=self.mask_token_id)
        return decode_stage(self, stage, backend=backend, progress=progress, desc=f"{self.engine_family} decoding",
                            callback=report)

    def _output(self, tokens: torch.Tensor, output_type: str, return_dict: bool | None):
        images = tokens if output_type in ("latent", "tokens") else format_output(self.decode(tokens), output_type)
        return pipeline_output(images, return_dict)


def diffusers_token_mask(mask_image, height: int, width: int) -> torch.Tensor:
    """diffusers' aMUSEd inpainting mask at token resolution -> bool (B, height, width):
    resize the mask to the token grid (PIL: Lanczos then grayscale; arrays and tensors:
    nearest) and keep the values >= 0.5."""
    images = mask_image if isinstance(mask_image, (list, tuple)) else [mask_image]
    if images and all(isinstance(im, Image.Image) for im in images):
        arr = np.stack([np.asarray(im.resize((width, height), resample=Image.Resampling.LANCZOS).convert("L"),
                                   dtype=np.float32) / 255.0 for im in images])
        return torch.from_numpy(arr) >= 0.5
    parts = []
    for m in images:
        if isinstance(m, np.ndarray):
            a = m[None] if m.ndim == 3 and m.shape[-1] == 1 else m[..., None] if m.ndim == 3 else m
            a = a[None, ..., None] if a.ndim == 2 else a
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).permute(0, 3, 1, 2)
        elif isinstance(m, torch.Tensor):
            t = m[None, None] if m.dim() == 2 else m[:, None] if m.dim() == 3 else m
            t = t.float()
        else:
            raise TypeError(f"mask_image must be PIL images, numpy arrays or tensors, got {type(m).__name__}")
        if t.dim() != 4 or t.shape[1] != 1:
            raise ValueError(f"mask_image must have one channel: (H, W), (B, H, W) or (B, 1, H, W), got "
                             f"{tuple(m.shape)}")
        parts.append(t)
    return F.interpolate(torch.cat(parts).cpu(), size=(height, width))[:, 0] >= 0.5


# -- argument and file functions ------------------------------------------------------


def _check_sampler(sampler: str) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return sampler


def _steps(num_inference_steps, num_steps, default: int = 12) -> int:
    if num_inference_steps is not None and num_steps is not None and num_inference_steps != num_steps:
        raise ValueError(f"num_inference_steps={num_inference_steps} and num_steps={num_steps} disagree")
    steps = num_inference_steps if num_inference_steps is not None else num_steps if num_steps is not None else default
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {steps!r}")
    return steps


def _embeddings(pooled, hidden, pooled_name: str, hidden_name: str):
    """(pooled (B, P), hidden (B, L, E)) from diffusers' pair of arguments or a TextEmbeddings."""
    if isinstance(pooled, TextEmbeddings):
        if hidden is not None:
            raise ValueError(f"{pooled_name} is a TextEmbeddings: do not also pass {hidden_name}")
        if pooled.pooled is None:
            raise ValueError(f"{pooled_name} has no pooled vector; aMUSEd needs CLIP's projected text_embeds")
        return pooled.pooled, pooled.hidden
    if pooled is None and hidden is None:
        return None, None
    if pooled is None or hidden is None:
        raise ValueError(f"pass either both {pooled_name} and {hidden_name} or neither")
    if pooled.dim() != 2 or hidden.dim() != 3 or pooled.shape[0] != hidden.shape[0]:
        raise ValueError(f"{pooled_name} must be (B, P) and {hidden_name} (B, L, E) with one B, got "
                         f"{tuple(pooled.shape)} and {tuple(hidden.shape)}")
    return pooled, hidden


def _match_batch(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Image tokens (Bi, h, w) for n prompts: Bi must be n, or 1 (shared by every prompt)."""
    if tokens.shape[0] == n:
        return tokens
    if tokens.shape[0] == 1:
        return tokens.expand(n, -1, -1).clone()
    raise ValueError(f"{tokens.shape[0]} images for {n} prompts: pass one image per prompt, or one image")


def _progress(steps, enabled: bool):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc="aMUSEd decoding", leave=False)


def _resolve(folder_or_hub_id, variant: str | None, local_files_only: bool) -> Path:
    path = Path(folder_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not HUB_ID.match(str(folder_or_hub_id)):
        raise FileNotFoundError(f"{folder_or_hub_id!r} is neither a local folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    ignore = ["*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.h5"]
    # full-precision files are <stem>.safetensors, variants <stem>.<variant>.safetensors
    ignore += ["*model.safetensors"] if variant else ["*.*.safetensors"]
    return Path(snapshot_download(str(folder_or_hub_id), ignore_patterns=ignore, local_files_only=local_files_only))


def _check_variant(folder: Path, variant: str | None) -> None:
    """diffusers' rule: a ``variant`` that no component folder has files of is an error."""
    if variant and not any(any(sub.glob(f"*.{variant}.*")) for sub in folder.iterdir() if sub.is_dir()):
        raise ValueError(f"You are trying to load the model files of the `variant={variant}`, but no such modeling "
                         f"files are available in {folder}: pass variant=None to load the full-precision files")


def _log_loaded(pipe, folder: Path) -> None:
    for name, component in pipe.components.items():
        if component is not None:
            LOAD_LOGGER.info(f"Loaded {name} as {type(component).__name__} from `{name}` subfolder of {folder}.")


def _present(variant: str | None, folder: Path) -> str | None:
    """``variant`` if ``folder`` has files of it, else None (then the full-precision files)."""
    return variant if variant and any(folder.glob(f"*.{variant}.safetensors*")) else None


def _load_clip(folder: Path, variant: str | None, device, dtype) -> CLIPTextEncoder:
    """CLIP text encoder + tokenizer of an aMUSEd folder, preferring the weight ``variant``."""
    te = folder / "text_encoder"
    variants = sorted(p.name.split(".")[1] for p in te.glob("model.*.safetensors") if p.name.count(".") == 2)
    full = any((te / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    use = variant if variant in variants else (variants[0] if not full and len(variants) == 1 else None)
    if use is None:
        return runnable(CLIPTextEncoder.from_pretrained(folder, subfolder="text_encoder",
                                                        tokenizer_subfolder="tokenizer", device=device, dtype=dtype))
    import transformers

    model = transformers.CLIPTextModelWithProjection.from_pretrained(
        te, variant=use, local_files_only=True, **({"dtype": dtype} if dtype is not None else {}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    encoder = CLIPTextEncoder(model, tokenizer)
    if device is not None:
        encoder.to(device)
    return runnable(encoder)
