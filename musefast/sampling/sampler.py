"""``MaskGitSampler``: the MaskGIT / Muse decoding loop over the fused step.

Each step calls the model on the current tokens (masked positions hold ``mask_token_id``),
then one ``ops.cfg_sample_remask`` does guidance, sampling, confidence and re-masking with the
preset's parameters for that step. The Philox counter uses the step index, so a fixed seed
gives the same tokens on every backend (up to floating-point near-ties).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from musefast import ops
from musefast.sampling.cache import CacheRun, GuidedForward, StepCache, resolve_cache
from musefast.sampling.presets import Preset, get_preset
from musefast.sampling.schedules import check_guidance_interval, check_guidance_scale, guidance_scale_at, uses_guidance

ModelFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


class MaskGitSampler:
    """Runs the T decoding steps of a preset.

    Args:
        preset: ``"amused"``, ``"maskgit"``, ``"lucidrains"`` or a :class:`Preset`.
        backend: backend of ``cfg_sample_remask`` (None = the best available).
        progress: show a tqdm progress bar.
        cache: the step cache (``musefast.sampling.cache``): None (exact), ``"fast"`` or a
            :class:`StepCache`; needs a :class:`GuidedForward` as ``model_fn``. A cache
            setting's ``guidance_interval`` applies unless one is given here.
        **overrides: fields of the preset to change, e.g. ``num_steps=16, guidance_scale=4.0,
            guidance_schedule="linear", guidance_interval=(0.0, 0.5), temperature=0.9,
            choice_temperature=(3.0, 0.0), mask_schedule="linear"`` (None = keep the preset's
            value). ``guidance_scale`` follows diffusers: <= 1 means no guidance (an unconditional
            branch from ``model_fn`` is ignored), negative or non-finite is an error. Steps without
            guidance run the conditional branch alone when ``model_fn`` is a :class:`GuidedForward`.
    """

    def __init__(self, preset: str | Preset = "amused", *, backend: str | None = None, progress: bool = True,
                 cache: str | StepCache | None = None, **overrides):
        unknown = set(overrides) - {f.name for f in Preset.__dataclass_fields__.values()} - {"name"}
        if unknown:
            raise TypeError(f"unknown preset field(s): {sorted(unknown)}")
        self.preset = get_preset(preset).replace(**overrides)
        if not isinstance(self.preset.num_steps, int) or self.preset.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.preset.num_steps!r}")
        self.use_guidance = uses_guidance(check_guidance_scale(self.preset.guidance_scale))
        if self.preset.guidance_interval is not None:
            check_guidance_interval(self.preset.guidance_interval)
        self.backend = backend
        self.progress = progress
        self.cache = resolve_cache(cache)
        if self.cache is not None and self.preset.guidance_interval is None:
            self.preset = self.preset.replace(guidance_interval=self.cache.guidance_interval)
        self.last_cache_run: CacheRun | None = None  # the last call's cache (step counts, memory), for reports

    def step(self, model_fn: ModelFn, tokens: torch.Tensor, masked: torch.Tensor, *, shape: torch.Size, step: int,
             seed: int | list[int], mask_token_id: int, masked_start: torch.Tensor, starting_mask_ratio=1.0,
             run: CacheRun | None = None):
        """One decoding step on flat (B, N) ``tokens``/``masked`` -> the next (tokens, masked).

        The model forward (through the step cache's ``run`` when there is one; a
        :class:`GuidedForward` skips the unconditional branch on steps without guidance), the
        preset's parameters for ``step`` and the fused ``cfg_sample_remask``: without a cache,
        the unit ``torch.compile(fullgraph=True)`` and a CUDA graph capture.
        """
        preset = self.preset
        B, N = tokens.shape
        model_in = tokens.masked_fill(masked, mask_token_id).reshape(shape)
        # diffusers' rule, per step: guidance only where the step's scale is above 1
        guided = self.use_guidance and uses_guidance(guidance_scale_at(
            preset.guidance_schedule, preset.guidance_scale, step, preset.num_steps, preset.guidance_interval))
        if run is not None or isinstance(model_fn, GuidedForward):
            cond, uncond = run(model_in, masked, guided) if run is not None else model_fn(model_in, cfg=guided)
        else:
            out = model_fn(model_in)
            cond, uncond = out if isinstance(out, (tuple, list)) else (out, None)
            if not guided:
                uncond = None  # the conditional branch alone, as diffusers
        K = cond.shape[-1]
        params = self.preset.step_params(
            step, num_classes=K, masked_now=masked.sum(dim=1), masked_start=masked_start, seq_len=N,
            starting_mask_ratio=starting_mask_ratio,
        )
        cond = cond.reshape(B, N, K)
        uncond = None if uncond is None else uncond.reshape(B, N, K)
        if isinstance(seed, (list, tuple)):  # one seed per image (batch generation)
            return self._step_per_image(cond, uncond, tokens, masked, seed, step, params)
        return ops.cfg_sample_remask(cond, uncond, tokens=tokens, masked=masked, seed=seed, step=step,
                                     backend=self.backend, **params)

    @torch.no_grad()
    def __call__(
        self,
        model_fn: ModelFn,
        tokens: torch.Tensor,
        masked: torch.Tensor | None = None,
        *,
        mask_token_id: int,
        seed: int | Sequence[int] = 0,
        start_step: int = 0,
        starting_mask_ratio=None,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Decode ``tokens``.

        Args:
            model_fn: tokens (B, *shape) int64 -> logits (B, *shape, K), or a pair
                (cond logits, uncond logits) for classifier-free guidance; or a
                :class:`GuidedForward` (needed by the cache and to halve the batch on steps
                without guidance).
            tokens: (B, *shape) int64; positions to generate may hold anything.
            masked: (B, *shape) bool, True = generate; default ``tokens == mask_token_id``.
            mask_token_id: id written at masked positions of the model's input.
            seed: Philox seed (int in [0, 2**64)), or one seed per image: then each image is
                sampled as if it were alone in its batch (Philox's counter holds the image's
                index in the batch), so its tokens do not depend on its batch neighbours.
            start_step: first step to run (image-to-image starts part-way).
            starting_mask_ratio: aMUSEd's inpainting scale of the mask counts; default: the
                masked fraction of the batch (1 when everything is masked).
            callback: called as ``callback(step, tokens, masked)`` after every step; when it
                returns a tensor, that replaces the tokens (its ``mask_token_id`` entries are
                the masked ones).

        Returns:
            (B, *shape) int64 tokens, none of them masked; known tokens are unchanged.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() < 2:
            raise TypeError("tokens must be an int64 tensor of shape (B, *token_shape)")
        shape = tokens.shape
        if masked is None:
            masked = tokens == mask_token_id
        if masked.shape != shape or masked.dtype != torch.bool:
            raise ValueError(f"masked must be a bool tensor of shape {tuple(shape)}")
        preset = self.preset
        T = preset.num_steps
        if not 0 <= start_step < T:
            raise ValueError(f"start_step must lie in [0, num_steps={T}), got {start_step}")
        B = shape[0]
        seeds = _per_image_seeds(seed, B)
        tokens = tokens.reshape(B, -1).clone()
        masked = masked.reshape(B, -1).clone()
        masked_start = masked.sum(dim=1)
        if starting_mask_ratio is None:
            starting_mask_ratio = masked_start.sum() / masked.numel() if masked.numel() else 1.0
        steps = range(start_step, T)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{preset.name} decoding", leave=False)
        guided = isinstance(model_fn, GuidedForward)
        if self.cache is not None and not guided:
            raise ValueError("cache= needs a musefast.sampling.GuidedForward as model_fn: a plain function "
                             "cannot run a subset of the tokens")
        run = CacheRun(self.cache, model_fn) if self.cache is not None else None
        self.last_cache_run = run
        for step in steps:
            tokens, masked = self.step(model_fn, tokens, masked, shape=shape, step=step,
                                       seed=seed if seeds is None else seeds,
                                       mask_token_id=mask_token_id, masked_start=masked_start,
                                       starting_mask_ratio=starting_mask_ratio, run=run)
            replaced = None if callback is None else callback(step, tokens.reshape(shape), masked.reshape(shape))
            if replaced is not None:  # a step callback may replace the tokens (diffusers' callback_on_step_end)
                tokens = replaced.reshape(B, -1).to(tokens)
                masked = tokens == mask_token_id
        return tokens.reshape(shape)

    def _step_per_image(self, cond, uncond, tokens, masked, seeds, step, params):
        """One step image by image, each with its own seed as image 0 of a batch of one.
        (The kernels key a whole batch by one seed; a per-image key would save these calls.)"""
        counts = params.pop("num_to_mask")
        out_tokens, out_masked = [], []
        for b, seed in enumerate(seeds):
            count = counts[b:b + 1] if isinstance(counts, torch.Tensor) and counts.dim() else counts
            t, m = ops.cfg_sample_remask(cond[b:b + 1], None if uncond is None else uncond[b:b + 1],
                                         tokens=tokens[b:b + 1], masked=masked[b:b + 1], num_to_mask=count,
                                         seed=seed, step=step, backend=self.backend, **params)
            out_tokens.append(t)
            out_masked.append(m)
        return torch.cat(out_tokens), torch.cat(out_masked)


def _per_image_seeds(seed, batch_size: int) -> list[int] | None:
    """None for one seed for the batch; the list when ``seed`` gives one per image."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch_size:
            raise ValueError(f"seed has {len(seed)} entries for a batch of {batch_size} images")
        return list(seed)
    return None
