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

import torch

from musefast.models.serialization import load_component, save_component
from musefast.ops.registry import use_backend
from musefast.models.text import TextEmbeddings, as_text_embeddings, load_text_encoder
from musefast.models.transformer import Context, MuseTransformer, SuperResTransformer
from musefast.models.vqgan import VQGAN
from musefast.pipelines.images import OUTPUT_TYPES, format_output, to_mask, to_tensor, token_mask
from musefast.sampling import MaskGitSampler

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
    guidance_schedule: str = "constant"  # or "linear" (the Muse ramp), "cosine"
    temperature: float = 1.0
    choice_temperature: float = 4.5  # annealed by the preset's choice schedule (maskgit: ·(1 − r))
    mask_schedule: str = "cosine"
    # mask-free editing (Muse §3.3): resample this fraction of tokens per iteration
    edit_iterations: int = 100
    edit_fraction: float = 0.08
    edit_guidance_scale: float = 4.0
    edit_top_k: int = 3


class MusePipeline:
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
        for module in self._modules().values():
            module.eval()

    # -- components ------------------------------------------------------------------------

    def _modules(self) -> dict:
        mods = {"vqgan": self.vqgan, "transformer": self.transformer, "text_encoder": self.text_encoder,
                "super_res": self.super_res, "vqgan_high": self.vqgan_high}
        return {k: v for k, v in mods.items() if v is not None}

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def to(self, device=None, dtype=None) -> "MusePipeline":
        for name, module in self._modules().items():
            # tokenizers and text encoders keep their own dtype policy; VQGANs upcast themselves
            module.to(device=device, dtype=dtype if name != "text_encoder" else None)
        return self

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
            prompts = _as_list(prompt, "prompt")
            cond = self._text_encoder().encode(prompts)
        n = cond.batch_size
        if negative_prompt_embeds is not None:
            uncond = as_text_embeddings(negative_prompt_embeds, hidden_size=self.transformer.config.text_dim,
                                        batch_size=n, name="negative_prompt_embeds")
        else:
            negatives = [""] * n if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1 and n > 1:
                negatives = negatives * n
            if len(negatives) != n:
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {n} prompts")
            uncond = self._text_encoder().encode_cached(negatives)  # "" and negatives repeat: cached
        if uncond.seq_len != cond.seq_len:
            raise ValueError(f"negative_prompt_embeds has {uncond.seq_len} tokens but prompt_embeds has "
                             f"{cond.seq_len}: pad both to one length (with a mask)")
        return cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype)

    def _text_encoder(self):
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds (and negative_prompt_embeds)")
        return self.text_encoder

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
        return (self.vqgan_high if high_res else self.vqgan).encode(img)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, *, high_res: bool | None = None) -> torch.Tensor:
        """Tokens (B, h, w) -> images (B, 3, H, W) float in [0, 1]."""
        if high_res is None:
            high_res = self.super_res is not None and tokens.shape[-1] == self.super_res.config.high.grid_size
        vq = self.vqgan_high if high_res else self.vqgan
        return vq.decode(tokens.to(self.device)).float().clamp(0, 1)

    # -- decoding --------------------------------------------------------------------------

    def _settings(self, overrides: dict) -> MuseSettings:
        known = {f.name for f in fields(MuseSettings)}
        unknown = sorted(k for k, v in overrides.items() if k not in known)
        if unknown:
            raise TypeError(f"unexpected argument(s) {unknown}")
        return replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})

    def _sampler(self, s: MuseSettings, num_steps: int, backend, progress, *, guidance_scale=None,
                 top_k: int | None = None, codebook_size: int | None = None) -> MaskGitSampler:
        overrides = dict(num_steps=num_steps, mask_schedule=s.mask_schedule,
                         guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
                         guidance_schedule=s.guidance_schedule, temperature=s.temperature,
                         choice_temperature=s.choice_temperature)
        if top_k is not None:
            # presets express top-k as lucidrains' threshold: keep ceil((1 - thres) K) logits;
            # aim at the middle of the interval that gives exactly top_k
            overrides["topk_filter_thres"] = 1.0 - (top_k - 0.5) / codebook_size
        return MaskGitSampler(s.preset, backend=backend, progress=progress, **overrides)

    @staticmethod
    def _guided_forward(model, context: Context, use_cfg: bool, **extra):
        """tokens (B, N) -> (cond, uncond) logits: both branches in one batched forward."""

        def forward(tokens: torch.Tensor):
            if not use_cfg:
                return model(tokens, context=context, **extra), None
            logits = model(torch.cat([tokens, tokens]), context=context, **extra)
            return logits.chunk(2)

        return forward

    def _contexts(self, model_prepare, cond_args, uncond_args, use_cfg: bool) -> Context:
        cond = model_prepare(*cond_args)
        if not use_cfg:
            return cond
        return Context.cat([cond, model_prepare(*uncond_args)])

    @torch.no_grad()
    def _decode_stage(self, *, stage: str, tokens, masked, cond: TextEmbeddings, uncond: TextEmbeddings,
                      s: MuseSettings, seed: int, backend, progress, low_tokens=None, num_steps=None,
                      guidance_scale=None):
        """Run one stage's sampler from (tokens, masked); returns the final tokens (B, N)."""
        g = s.guidance_scale if guidance_scale is None else guidance_scale
        use_cfg = g != 1.0
        if stage == "base":
            model = self.transformer
            context = self._contexts(model.prepare_context, (cond.hidden, cond.mask),
                                     (uncond.hidden, uncond.mask), use_cfg)
            steps = s.num_steps if num_steps is None else num_steps
        else:
            model = self.super_res
            context = self._contexts(model.prepare_context, (low_tokens, cond.hidden, cond.mask),
                                     (low_tokens, uncond.hidden, uncond.mask), use_cfg)
            steps = s.super_res_steps if num_steps is None else num_steps
        sampler = self._sampler(s, steps, backend, progress, guidance_scale=g)
        forward = self._guided_forward(model, context, use_cfg)
        return sampler(forward, tokens, masked, mask_token_id=model.mask_token_id, seed=seed)

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
             high_tokens=None, high_masked=None):
        """Base stage (from the given state, or all masked), then super-res if present."""
        B = cond.batch_size
        cfg = self.transformer.config
        seed = _resolve_seed(seed)
        if base_tokens is None:
            base_tokens = torch.full((B, cfg.seq_len), cfg.mask_token_id, dtype=torch.long, device=self.device)
            base_masked = torch.ones(B, cfg.seq_len, dtype=torch.bool, device=self.device)
        low = self._decode_stage(stage="base", tokens=base_tokens, masked=base_masked, cond=cond, uncond=uncond,
                                 s=s, seed=seed, backend=backend, progress=progress)
        low = low.view(B, cfg.grid_size, cfg.grid_size)
        if self.super_res is None:
            return low
        hcfg = self.super_res.config.high
        if high_tokens is None:
            high_tokens = torch.full((B, hcfg.seq_len), hcfg.mask_token_id, dtype=torch.long, device=self.device)
            high_masked = torch.ones(B, hcfg.seq_len, dtype=torch.bool, device=self.device)
        high = self._decode_stage(stage="super-res", tokens=high_tokens, masked=high_masked, cond=cond,
                                  uncond=uncond, s=s, seed=seed + 1, backend=backend,
                                  progress=progress, low_tokens=low)
        return high.view(B, hcfg.grid_size, hcfg.grid_size)

    def _output(self, tokens, output_type):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "tokens":
            return tokens
        return format_output(self.decode(tokens), output_type)

    @_scoped_backend
    def __call__(self, prompt=None, *, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                 num_steps=None, super_res_steps=None, guidance_scale=None, guidance_schedule=None,
                 temperature=None, choice_temperature=None, seed=None, num_images_per_prompt=1,
                 output_type="pil", backend=None, progress=True):
        """Generate images for ``prompt`` (a string or a list of strings).

        Returns a list of PIL images (``output_type="pil"``), a numpy array (B, H, W, 3)
        (``"np"``), a tensor (B, 3, H, W) in [0, 1] (``"pt"``) or the tokens (``"tokens"``).
        """
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass a prompt or prompt_embeds")
        s = self._settings(dict(num_steps=num_steps, super_res_steps=super_res_steps, guidance_scale=guidance_scale,
                                guidance_schedule=guidance_schedule, temperature=temperature,
                                choice_temperature=choice_temperature))
        cond, uncond = self._prepare(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                     num_images_per_prompt)
        tokens = self._run(cond, uncond, s, seed, backend, progress)
        return self._output(tokens, output_type)

    # -- zero-shot editing -----------------------------------------------------------------

    def _edit_state(self, image, pixel_mask):
        """Encode the image at each stage and mask the tokens under the pixel mask."""
        img = to_tensor(image).to(self.device)
        B = img.shape[0]
        if pixel_mask.shape[0] not in (1, B):
            raise ValueError(f"mask batch ({pixel_mask.shape[0]}) must be 1 or match the images ({B})")
        if tuple(pixel_mask.shape[-2:]) != tuple(img.shape[-2:]):
            raise ValueError(f"mask size {tuple(pixel_mask.shape[-2:])} != image size {tuple(img.shape[-2:])}")
        if tuple(img.shape[-2:]) != (self.output_size, self.output_size):
            raise ValueError(f"image must be {self.output_size}x{self.output_size} for this model, "
                             f"got {img.shape[-2]}x{img.shape[-1]}")
        pixel_mask = pixel_mask.to(self.device).expand(B, -1, -1)
        state = {}
        stages = [("base", self.vqgan, self.transformer)]
        if self.super_res is not None:
            stages.append(("high", self.vqgan_high, self.super_res))
        for name, vq, model in stages:
            f = self.output_size // (vq.downsampling_factor * _grid(model))
            src = img if f == 1 else torch.nn.functional.interpolate(img, scale_factor=1 / f, mode="area")
            m = pixel_mask if f == 1 else torch.nn.functional.max_pool2d(pixel_mask[:, None].float(), f)[:, 0] > 0
            tokens = vq.encode(src).flatten(1)
            tmask = token_mask(m, vq.downsampling_factor).flatten(1)
            state[name] = (tokens.masked_fill(tmask, model.mask_token_id), tmask)
        return state

    @_scoped_backend
    def inpaint(self, image, mask, prompt=None, *, negative_prompt=None, prompt_embeds=None,
                negative_prompt_embeds=None, seed=None, output_type="pil", backend=None, progress=True, **overrides):
        """Repaint the region under ``mask`` (white / nonzero = repaint) following ``prompt``.

        Every token not under the mask keeps its ``encode(image)`` value exactly; with a
        super-res stage both resolutions are inpainted (multi-scale).
        """
        pixel_mask = to_mask(mask)
        state = self._edit_state(image, pixel_mask)
        s = self._settings(overrides)
        cond, uncond = self._prompts_for_images(state["base"][0].shape[0], prompt, negative_prompt, prompt_embeds,
                                                negative_prompt_embeds)
        high = state.get("high", (None, None))
        tokens = self._run(cond, uncond, s, seed, backend, progress, base_tokens=state["base"][0],
                           base_masked=state["base"][1], high_tokens=high[0], high_masked=high[1])
        return self._output(tokens, output_type)

    def outpaint(self, image, prompt=None, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                 fill: float = 0.5, **kw):
        """Grow the canvas by the given pixel margins and generate the new region.

        The grown canvas must be the model's resolution; tokens fully inside the original
        image are kept exactly.
        """
        img = to_tensor(image)
        for name, v in dict(left=left, right=right, top=top, bottom=bottom).items():
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int (pixels), got {v!r}")
        if left + right + top + bottom == 0:
            raise ValueError("outpaint needs at least one of left/right/top/bottom > 0")
        H, W = img.shape[-2] + top + bottom, img.shape[-1] + left + right
        if (H, W) != (self.output_size, self.output_size):
            raise ValueError(f"image {img.shape[-2]}x{img.shape[-1]} grown by top={top} bottom={bottom} left={left} "
                             f"right={right} is {H}x{W}; this model makes {self.output_size}x{self.output_size}")
        canvas = torch.nn.functional.pad(img, (left, right, top, bottom), value=fill)
        mask = torch.ones(img.shape[0], H, W, dtype=torch.bool)
        mask[:, top:top + img.shape[-2], left:left + img.shape[-1]] = False
        return self.inpaint(canvas, mask, prompt, **kw)

    @_scoped_backend
    @torch.no_grad()
    def edit(self, image, prompt=None, *, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
             iterations=None, fraction=None, guidance_scale=None, top_k=None, seed=None, output_type="pil",
             backend=None, progress=True):
        """Mask-free editing (Muse §3.3): ``iterations`` rounds, each resampling a random
        ``fraction`` of the base tokens in one step under ``prompt`` (guidance, top-k)."""
        s = self.settings
        iterations = s.edit_iterations if iterations is None else iterations
        fraction = s.edit_fraction if fraction is None else fraction
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        img = to_tensor(image).to(self.device)
        if tuple(img.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"image must be {self.image_size}x{self.image_size} (the base stage), "
                             f"got {img.shape[-2]}x{img.shape[-1]}")
        tokens = self.vqgan.encode(img).flatten(1)
        B, N = tokens.shape
        cond, uncond = self._prompts_for_images(B, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        count = max(1, round(fraction * N))
        seed = _resolve_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        g = s.edit_guidance_scale if guidance_scale is None else guidance_scale
        sampler = self._sampler(s, 1, backend, False, guidance_scale=g, top_k=s.edit_top_k if top_k is None else top_k,
                                codebook_size=self.transformer.config.codebook_size)
        use_cfg = g != 1.0
        context = self._contexts(self.transformer.prepare_context, (cond.hidden, cond.mask),
                                 (uncond.hidden, uncond.mask), use_cfg)
        forward = self._guided_forward(self.transformer, context, use_cfg)
        from tqdm.auto import tqdm

        for it in tqdm(range(iterations), desc="musefast edit", disable=not progress):
            chosen = torch.rand(B, N, generator=gen).argsort(dim=1)[:, :count].to(self.device)
            masked = torch.zeros(B, N, dtype=torch.bool, device=self.device).scatter_(1, chosen, True)
            start = tokens.masked_fill(masked, self.transformer.mask_token_id)
            tokens = sampler(forward, start, masked, mask_token_id=self.transformer.mask_token_id, seed=seed + it + 1)
        tokens = tokens.view(B, self.transformer.config.grid_size, -1)
        return self._output(tokens, output_type)

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
    def from_pretrained(cls, folder: str | os.PathLike, *, device=None, dtype="auto") -> "MusePipeline":
        """Load a folder written by :meth:`save_pretrained`. ``dtype`` of the transformers:
        ``"auto"`` (default) = bfloat16 on a CPU with native bf16, else float32 (see
        :func:`musefast.engine.cpu.resolve_dtype`); None = float32. The VQGANs stay float32."""
        folder = Path(folder)
        index_file = folder / PIPELINE_INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: not a musefast pipeline folder")
        index = json.loads(index_file.read_text())
        parts = {}
        for name, sub in index["components"].items():
            path = folder / sub
            if not path.is_dir():
                raise FileNotFoundError(f"component {name!r} missing: {path}")
            parts[name] = (load_text_encoder(path, device=device) if name == "text_encoder"
                           else load_component(path, device=device, dtype=None if name.startswith("vqgan") else dtype))
        for required in ("vqgan", "transformer"):
            if required not in parts:
                raise ValueError(f"{index_file} lists no {required!r} component")
        return cls(parts["vqgan"], parts["transformer"], parts.get("text_encoder"),
                   super_res=parts.get("super_res"), vqgan_high=parts.get("vqgan_high"),
                   settings=MuseSettings(**index.get("settings", {})))


def _resolve_seed(seed) -> int:
    """None -> a fresh seed from torch's global RNG (so torch.manual_seed governs it too)."""
    if seed is None:
        return int(torch.randint(0, 2**62, ()))
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return seed


def _grid(model) -> int:
    return model.config.high.grid_size if isinstance(model, SuperResTransformer) else model.config.grid_size


def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
