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
from musefast.sampling.presets import Preset, get_preset

ModelFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


class MaskGitSampler:
    """Runs the T decoding steps of a preset.

    Args:
        preset: ``"amused"``, ``"maskgit"``, ``"lucidrains"`` or a :class:`Preset`.
        backend: backend of ``cfg_sample_remask`` (None = the best available).
        progress: show a tqdm progress bar.
        **overrides: fields of the preset to change, e.g. ``num_steps=16, guidance_scale=4.0,
            guidance_schedule="linear", temperature=0.9, choice_temperature=(3.0, 0.0),
            mask_schedule="linear"`` (None = keep the preset's value).
    """

    def __init__(self, preset: str | Preset = "amused", *, backend: str | None = None, progress: bool = True,
                 **overrides):
        unknown = set(overrides) - {f.name for f in Preset.__dataclass_fields__.values()} - {"name"}
        if unknown:
            raise TypeError(f"unknown preset field(s): {sorted(unknown)}")
        self.preset = get_preset(preset).replace(**overrides)
        if not isinstance(self.preset.num_steps, int) or self.preset.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.preset.num_steps!r}")
        self.backend = backend
        self.progress = progress

    def step(self, model_fn: ModelFn, tokens: torch.Tensor, masked: torch.Tensor, *, shape: torch.Size, step: int,
             seed: int | list[int], mask_token_id: int, masked_start: torch.Tensor, starting_mask_ratio=1.0):
        """One decoding step on flat (B, N) ``tokens``/``masked`` -> the next (tokens, masked).

        The model forward, the preset's parameters for ``step`` and the fused
        ``cfg_sample_remask``: the unit ``torch.compile(fullgraph=True)`` and a CUDA graph capture.
        """
        B, N = tokens.shape
        model_in = tokens.masked_fill(masked, mask_token_id).reshape(shape)
        out = model_fn(model_in)
        cond, uncond = out if isinstance(out, (tuple, list)) else (out, None)
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
                (cond logits, uncond logits) for classifier-free guidance.
            tokens: (B, *shape) int64; positions to generate may hold anything.
            masked: (B, *shape) bool, True = generate; default ``tokens == mask_token_id``.
            mask_token_id: id written at masked positions of the model's input.
            seed: Philox seed (int in [0, 2**64)), or one seed per image: then each image is
                sampled as if it were alone in its batch (Philox's counter holds the image's
                index in the batch), so its tokens do not depend on its batch neighbours.
            start_step: first step to run (image-to-image starts part-way).
            starting_mask_ratio: aMUSEd's inpainting scale of the mask counts; default: the
                masked fraction of the batch (1 when everything is masked).
            callback: called as ``callback(step, tokens, masked)`` after every step.

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
        for step in steps:
            tokens, masked = self.step(model_fn, tokens, masked, shape=shape, step=step,
                                       seed=seed if seeds is None else seeds,
                                       mask_token_id=mask_token_id, masked_start=masked_start,
                                       starting_mask_ratio=starting_mask_ratio)
            if callback is not None:
                callback(step, tokens.reshape(shape), masked.reshape(shape))
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
