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
from musefast.cpu import conv as cpu_conv, int8
from musefast.models.meissonic import MeissonicTransformer
from musefast.models.text import CLIPTextEncoder
from musefast.models.vqgan import VQGAN
from musefast.models.vqmodel import load_vqmodel
from musefast.pipelines.amused import (
    PIPELINE_INDEX,
    AmusedPipeline,
    _check_sampler,
    _load_clip,
    _present,
    _resolve,
)
from musefast.pipelines.loading import resolve_dtype, runnable
from musefast.pipelines.shared import file_dtype
from musefast.pipelines.peer_components import (
    convert_components,
    convert_meissonic_transformer,
    is_peer_meissonic_transformer,
)
from musefast.generation.adapters import Stage

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

    engine_family = "meissonic"
    DEFAULTS = DEFAULTS
    _peer = "the peer"

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

    def _write_folder(self, folder, *, variant: str | None = None) -> None:
        """``save_pretrained``'s writer: the peer's folder layout (``Pipeline.from_pretrained`` of
        the peer and :func:`musefast.load` read it back)."""
        from musefast.pipelines.meissonic_save import save_meissonic

        save_meissonic(self, folder, variant=variant)

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
                where to run. The VQ's weights are always float32. ``"auto"`` (what ``musefast.load``
                passes): bfloat16 on a GPU and on a CPU that computes it natively (for models of 20M+
                parameters; there the VQ decoder computes in bf16 too), else the files' dtype; a compat-sampler call then runs on a twin in
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
                     else resolve_dtype("auto", device, weights_dtype, num_params))
            dtype = None if dtype == weights_dtype else dtype
        transformer = MeissonicTransformer.from_pretrained(
            folder / "transformer", variant=_present(variant, folder / "transformer"), device=device, dtype=dtype,
            backend=backend)
        runnable(transformer, quantize=quantize)
        vqvae = runnable(load_vqmodel(folder / "vqvae", variant=_present(variant, folder / "vqvae"), device=device))
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
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
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
        grid); ``callback_on_step_end`` as diffusers' pipelines. Returns as
        :meth:`AmusedPipeline.__call__`.
        """
        call_args = {k: v for k, v in locals().items() if k != "self"}
        if (sampler or self.sampler) == "compat" and self._compat_source is not None:
            return self._compat_pipeline()(**call_args)  # the files' own dtype: see from_pretrained
        if return_dict is None:
            call_args["return_dict"] = self._return_dict_default
        with self._offloaded():
            return self._generate(**call_args)

    def _timed_model(self, steps: int, start: int):
        """The transformer at the step's timestep (the scheduler's run T-1 ... 0): the compat
        sampler calls it once per step, in order, from ``start``."""
        step = [start]

        def model(tokens: torch.Tensor, *, context):
            timestep = torch.tensor([steps - 1 - step[0]], device=self.device)
            step[0] += 1
            return self.transformer(tokens, context=context, timestep=timestep).permute(0, 2, 3, 1)

        return model

    def _stage(self, context, tokens, **kw) -> Stage:
        stage = super()._stage(context, tokens, **kw)
        stage.forward.model = TimedTransformer(self.transformer, stage)  # what the step cache calls
        return stage


class TimedTransformer:
    """The transformer at the current step of ``stage`` (the step cache calls it with the rows
    it recomputes): channels-last logits (B, h, w, K), or the rows' (B, M, K)."""

    def __init__(self, transformer, stage: Stage):
        self.transformer, self.stage = transformer, stage

    def __call__(self, tokens, *, context, **cache_kw):
        t = torch.tensor([self.stage.num_steps - 1 - self.stage.step], device=tokens.device)
        out = self.transformer(tokens, context=context, timestep=t, **cache_kw)
        return out if cache_kw.get("rows") is not None else out.permute(0, 2, 3, 1)  # a view: channels-last memory


__all__ = ["MeissonicPipeline"]
