"""aMUSEd's decoding exactly as diffusers runs it, and a fused drop-in for its scheduler step.

:class:`AmusedCompatSampler` reproduces diffusers' ``AmusedScheduler`` (``set_timesteps``,
``add_noise``, ``step``) together with the CFG combine of ``AmusedPipeline``, op for op and in
the same dtypes, so it draws the same numbers from a ``torch.Generator`` in the same order:
one ``torch.multinomial`` over every position per step (on the generator's device, float32
on CPU), then — except at the last step — one uniform draw per position for the Gumbel noise
of the confidence (in the logits' dtype). With logits equal to diffusers', the tokens are
equal. It is the ``sampler="compat"`` of :class:`musefast.pipelines.amused.AmusedPipeline`.

:func:`fused_step` is a replacement for ``AmusedScheduler.step`` that runs the same decision
through the fused ``ops.cfg_sample_remask`` (same mask counts and choice temperatures, same
distribution; a Philox seed drawn from the generator instead of multinomial draws); it is
what :func:`musefast.accelerate` installs.
"""
from __future__ import annotations

import math

import torch

from musefast import ops
from musefast.sampling import mask_count

MASKING_SCHEDULES = ("cosine", "linear")


def choice_temperatures(num_steps: int, temperature, device=None) -> torch.Tensor:
    """diffusers' ``AmusedScheduler.set_timesteps``: linspace(t0, t1, T) for a pair, else
    linspace(t, 0.01, T) (float32)."""
    if isinstance(temperature, (tuple, list)):
        if len(temperature) != 2:
            raise ValueError(f"temperature must be a number or a (start, end) pair, got {temperature!r}")
        return torch.linspace(temperature[0], temperature[1], num_steps, device=device)
    return torch.linspace(temperature, 0.01, num_steps, device=device)


class AmusedCompatSampler:
    """diffusers' AmusedScheduler, consuming a ``torch.Generator`` exactly as it does.

    Args:
        num_steps: T (diffusers' ``num_inference_steps``).
        mask_token_id: the [MASK] id in the token grid (aMUSEd: 8255).
        temperature: choice temperature, (start, end) or a number (then end = 0.01).
        masking_schedule: ``"cosine"`` (text-to-image, image-to-image) or ``"linear"`` (inpaint).
        device: where the schedule tensors live (diffusers: the execution device).
    """

    def __init__(self, num_steps: int, *, mask_token_id: int, temperature=(2, 0), masking_schedule: str = "cosine",
                 device=None):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        if masking_schedule not in MASKING_SCHEDULES:
            raise ValueError(f"masking_schedule must be one of {MASKING_SCHEDULES}, got {masking_schedule!r}")
        self.mask_token_id = mask_token_id
        self.masking_schedule = masking_schedule
        self.timesteps = torch.arange(num_steps, device=device).flip(0)
        self.temperatures = choice_temperatures(num_steps, temperature, device)

    def _mask_ratio(self, step_idx: torch.Tensor) -> torch.Tensor:
        ratio = (step_idx + 1) / len(self.timesteps)
        if self.masking_schedule == "cosine":
            return torch.cos(ratio * math.pi / 2)
        return 1 - ratio

    def add_noise(self, tokens: torch.Tensor, start: int, generator: torch.Generator | None) -> torch.Tensor:
        """Image-to-image start: mask each token with probability γ of step ``start − 1``, as
        diffusers' ``add_noise(latents, timesteps[start − 1])`` (start 0 wraps to the last step,
        whose ratio is ~0: diffusers then masks nothing)."""
        step_idx = (self.timesteps == self.timesteps[start - 1]).nonzero()
        mask_ratio = self._mask_ratio(step_idx)
        device = generator.device if generator is not None else tokens.device
        chosen = torch.rand(tokens.shape, device=device, generator=generator).to(tokens.device) < mask_ratio
        noised = tokens.clone()
        noised[chosen] = self.mask_token_id
        return noised

    def step(self, logits: torch.Tensor, index: int, sample: torch.Tensor, *, starting_mask_ratio=1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One step. logits (B, N, K) (already guided), sample (B, *grid) with [MASK] ids ->
        the next sample, same shape."""
        shape = sample.shape
        B, N, K = logits.shape
        sample = sample.reshape(B, N)
        # diffusers' logits are (B, K, h, w) conv outputs viewed as (B, N, K): the softmax runs
        # over a strided dim, which can round differently from a contiguous one
        logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
        timestep = self.timesteps[index]
        unknown_map = sample == self.mask_token_id
        probs = logits.softmax(dim=-1)
        device = probs.device
        probs_ = probs.to(generator.device) if generator is not None else probs
        if probs_.device.type == "cpu" and probs_.dtype != torch.float32:
            probs_ = probs_.float()  # multinomial has no CPU half kernel
        drawn = torch.multinomial(probs_.reshape(-1, K), 1, generator=generator).to(device=device)
        pred = torch.where(unknown_map, drawn[:, 0].view(B, N), sample)
        if timestep == 0:
            return pred.reshape(shape)
        step_idx = (self.timesteps == timestep).nonzero()
        mask_len = (N * (starting_mask_ratio * self._mask_ratio(step_idx))).floor()
        mask_len = torch.min(unknown_map.sum(dim=-1, keepdim=True) - 1, mask_len)
        mask_len = torch.max(torch.tensor([1], device=logits.device), mask_len)
        selected = torch.gather(probs, -1, pred[:, :, None])[:, :, 0]
        selected = torch.where(unknown_map, selected, torch.finfo(selected.dtype).max)
        noise_device = generator.device if generator is not None else selected.device
        uniform = torch.zeros_like(selected, device=noise_device).uniform_(0, 1, generator=generator)
        gumbel = -torch.log((-torch.log(uniform.to(selected.device).clamp(1e-20))).clamp(1e-20))
        confidence = torch.log(selected.clamp(1e-20)) + self.temperatures[step_idx] * gumbel
        cut_off = torch.gather(torch.sort(confidence, dim=-1).values, 1, mask_len.long())
        return torch.where(confidence < cut_off, self.mask_token_id, pred).reshape(shape)


def seed_from_generator(generator: torch.Generator | None) -> int:
    """A 63-bit Philox seed drawn from ``generator`` (or torch's global RNG)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, device=device))


def fused_step(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, starting_mask_ratio=1.0,
               generator: torch.Generator | None = None, return_dict: bool = True, *, backend: str | None = None):
    """``AmusedScheduler.step`` through ``ops.cfg_sample_remask``: same signature and outputs
    (``prev_sample``, ``pred_original_sample``), same mask counts and choice temperature,
    tokens sampled from the same distribution with a Philox seed drawn from ``generator``.

    ``scheduler`` is the diffusers AmusedScheduler whose ``set_timesteps`` ran (its
    ``timesteps``, ``temperatures`` and config are read, never changed).
    """
    two_dim = sample.ndim == 3 and model_output.ndim == 4
    if two_dim:
        B, K, h, w = model_output.shape
        logits = model_output.reshape(B, K, h * w).transpose(1, 2)  # a view: the op takes any strides
        tokens = sample.reshape(B, h * w)
    else:
        logits, tokens = model_output, sample
        B, N, K = logits.shape
    mask_id = scheduler.config.mask_token_id
    masked = tokens == mask_id
    T = len(scheduler.timesteps)
    step = T - 1 - int(timestep)  # timesteps run T-1 .. 0
    if not 0 <= step < T:
        raise ValueError(f"timestep {int(timestep)} is not one of the scheduler's {T} timesteps")
    now = masked.sum(dim=1)
    num_to_mask = mask_count("amused", step, T, masked_now=now, masked_start=now, seq_len=tokens.shape[1],
                             schedule=scheduler.config.masking_schedule, starting_mask_ratio=starting_mask_ratio)
    pred, still = ops.cfg_sample_remask(
        logits, None, tokens=tokens, masked=masked, num_to_mask=num_to_mask,
        choice_temperature=float(scheduler.temperatures[step]), seed=seed_from_generator(generator), step=step,
        backend=backend,
    )
    prev = pred.masked_fill(still, mask_id)
    if two_dim:
        prev, pred = prev.reshape(B, h, w), pred.reshape(B, h, w)
    if not return_dict:
        return prev, pred
    from diffusers.schedulers.scheduling_amused import AmusedSchedulerOutput

    return AmusedSchedulerOutput(prev, pred)
