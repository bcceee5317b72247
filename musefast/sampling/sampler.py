"""``MaskGitSampler``: the MaskGIT / Muse decoding loop over the fused step.

Each step calls the model on the current tokens (masked positions hold ``mask_token_id``),
then one ``ops.cfg_sample_remask`` does guidance, sampling, confidence and re-masking with the
preset's parameters for that step. The Philox counter uses the step index, so a fixed seed
gives the same tokens on every backend (up to floating-point near-ties).
"""
from __future__ import annotations

from typing import Callable

import torch

from musefast import ops
from musefast.sampling.presets import Preset, get_preset
from musefast.sampling.schedules import check_guidance_scale, uses_guidance

ModelFn = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]


class MaskGitSampler:
    """Runs the T decoding steps of a preset.

    Args:
        preset: ``"amused"``, ``"maskgit"``, ``"lucidrains"`` or a :class:`Preset`.
        backend: backend of ``cfg_sample_remask`` (None = the best available).
        progress: show a tqdm progress bar.
        **overrides: fields of the preset to change, e.g. ``num_steps=16, guidance_scale=4.0,
            guidance_schedule="linear", temperature=0.9, choice_temperature=(3.0, 0.0),
            mask_schedule="linear"`` (None = keep the preset's value). ``guidance_scale`` follows
            diffusers: <= 1 means no guidance (an unconditional branch from ``model_fn`` is
            ignored; callers should not compute it), negative or non-finite is an error.
    """

    def __init__(self, preset: str | Preset = "amused", *, backend: str | None = None, progress: bool = True,
                 **overrides):
        unknown = set(overrides) - {f.name for f in Preset.__dataclass_fields__.values()} - {"name"}
        if unknown:
            raise TypeError(f"unknown preset field(s): {sorted(unknown)}")
        self.preset = get_preset(preset).replace(**overrides)
        if not isinstance(self.preset.num_steps, int) or self.preset.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.preset.num_steps!r}")
        self.use_guidance = uses_guidance(check_guidance_scale(self.preset.guidance_scale))
        self.backend = backend
        self.progress = progress

    @torch.no_grad()
    def __call__(
        self,
        model_fn: ModelFn,
        tokens: torch.Tensor,
        masked: torch.Tensor | None = None,
        *,
        mask_token_id: int,
        seed: int = 0,
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
            seed: Philox seed (int in [0, 2**64)).
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
        tokens = tokens.reshape(B, -1).clone()
        masked = masked.reshape(B, -1).clone()
        N = tokens.shape[1]
        masked_start = masked.sum(dim=1)
        if starting_mask_ratio is None:
            starting_mask_ratio = masked_start.sum() / masked.numel() if masked.numel() else 1.0
        steps = range(start_step, T)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"{preset.name} decoding", leave=False)
        for step in steps:
            model_in = tokens.masked_fill(masked, mask_token_id).reshape(shape)
            out = model_fn(model_in)
            cond, uncond = out if isinstance(out, (tuple, list)) else (out, None)
            if not self.use_guidance:
                uncond = None  # guidance <= 1: the conditional branch alone, as diffusers
            K = cond.shape[-1]
            params = preset.step_params(
                step, num_classes=K, masked_now=masked.sum(dim=1), masked_start=masked_start, seq_len=N,
                starting_mask_ratio=starting_mask_ratio,
            )
            tokens, masked = ops.cfg_sample_remask(
                cond.reshape(B, N, K), None if uncond is None else uncond.reshape(B, N, K),
                tokens=tokens, masked=masked, seed=seed, step=step, backend=self.backend, **params,
            )
            if callback is not None:
                callback(step, tokens.reshape(shape), masked.reshape(shape))
        return tokens.reshape(shape)
