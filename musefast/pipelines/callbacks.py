"""Step callbacks, one rule for every pipeline: diffusers' legacy ``callback`` and its newer
``callback_on_step_end``, whose returned ``"latents"`` replace the tokens."""
from __future__ import annotations

import torch

CALLBACK_TENSOR_INPUTS = ["latents"]  # what a callback may read: the token grid, masked entries at the mask id


def step_hook(pipe, callback, callback_steps, callback_on_step_end, tensor_inputs, start: int = 0):
    """One ``hook(step, timestep, latents) -> latents or None`` after each step, or None when
    there is nothing to call: diffusers' legacy ``callback`` every ``callback_steps`` steps (its
    step index counts from the schedule's start, as diffusers' aMUSEd), then
    ``callback_on_step_end(pipe, i, timestep, {name: tensor})`` (``i`` counts the steps this
    call runs, 0 .. num_timesteps - 1, as diffusers' newer pipelines)."""
    if callback_on_step_end is None and callback is None:
        return None
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise TypeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    if isinstance(callback_steps, bool) or not isinstance(callback_steps, int) or callback_steps < 1:
        raise ValueError(f"callback_steps must be a positive int, got {callback_steps!r}")
    offered = getattr(pipe, "_callback_tensor_inputs", CALLBACK_TENSOR_INPUTS)
    names = list(offered if tensor_inputs is None else tensor_inputs)
    unknown = [n for n in names if n not in offered]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not available; this pipeline "
                         f"offers {offered}")

    def hook(step, timestep, latents):
        if callback is not None and step % callback_steps == 0:
            callback(step, timestep, latents)
        if callback_on_step_end is None:
            return None
        out = callback_on_step_end(pipe, step - start, timestep, {n: latents for n in names}) or {}
        return out.get("latents")

    return hook


def check_latents(latents, shape, device) -> torch.Tensor:
    """Token ids a caller passed (``latents=``, or a callback's replacement) -> on ``device``."""
    if not isinstance(latents, torch.Tensor) or latents.dtype != torch.int64:
        raise TypeError("latents must be an int64 tensor of token ids (B, h, w)")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
    return latents.to(device)


def grid_reporter(hook, *, offset: int, num_steps: int, grid: tuple, mask_token_id: int):
    """The engine callback of one stage (flat (B, N) tokens) for ``hook``, which sees the token
    grid (B, h, w) with masked entries at ``mask_token_id``; ``offset``: the call's steps before
    this stage (a two-stage model counts its steps through both)."""
    def report(step, now, masked):
        rows = now.shape[0]
        latents = now.masked_fill(masked, mask_token_id).reshape(rows, *grid)
        replaced = hook(offset + step, num_steps - 1 - step, latents)
        return None if replaced is None else check_latents(replaced, tuple(latents.shape), now.device)

    return report
