"""Schedules of MaskGIT decoding: mask ratio, per-peer mask counts, temperatures, guidance.

Step ``i`` runs from 0 to ``T - 1``; ``r = (i + 1) / T`` is the fraction of the decoding done
after step i. Ratios are computed in float32 torch ops in the order the peers use, because
their mask counts are floors of float32 products: diffusers' float32 cosine makes aMUSEd's
step 8 of 12 keep 127 of 256 tokens masked, not 128.
"""
from __future__ import annotations

import math
import numbers

import torch

MASK_SCHEDULES = ("cosine", "linear", "pow", "log", "exp", "arccos")
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine", "cosine_decay")
CHOICE_SCHEDULES = ("constant", "linear", "maskgit")
TEMPERATURE_SCHEDULES = ("constant", "lucidrains")
MASK_COUNT_RULES = ("maskgit", "amused", "lucidrains")


def _f32(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def mask_ratio(schedule: str, r, *, total_tokens: int | None = None, exponent: float = 2.0) -> torch.Tensor:
    """Fraction of tokens still masked after a fraction ``r`` in [0, 1] of the decoding (float32).

    ``cosine``: cos(r·π/2) (MaskGIT, Muse, aMUSEd); ``linear``: 1 − r; ``pow``: 1 − r^exponent
    (also spelled ``pow2``, ``pow0.5``, ...);
    ``log``: −log2(r) / log2(total_tokens); ``exp``: 1 − 2^(−log2(total_tokens)·(1 − r))
    (both as in google-research/maskgit, they need ``total_tokens``); ``arccos``: arccos(r)/(π/2)
    (open-muse). The result is clipped to [0, 1].
    """
    r = _f32(r)
    if schedule.startswith("pow") and len(schedule) > 3:  # MaskGIT's names: "pow2", "pow0.5", ...
        schedule, exponent = "pow", float(schedule[3:])
    if schedule == "cosine":
        ratio = torch.cos(r * math.pi / 2)
    elif schedule == "linear":
        ratio = 1 - r
    elif schedule == "pow":
        ratio = 1 - r**exponent
    elif schedule in ("log", "exp"):
        if total_tokens is None or total_tokens < 2:
            raise ValueError(f"the {schedule!r} mask schedule needs total_tokens >= 2, got {total_tokens!r}")
        bits = math.log2(total_tokens)
        ratio = -torch.log2(r) / bits if schedule == "log" else 1 - torch.exp2(-bits * (1 - r))
    elif schedule == "arccos":
        ratio = torch.arccos(r) / (math.pi / 2)
    else:
        raise ValueError(f"mask schedule must be one of {MASK_SCHEDULES}, got {schedule!r}")
    return ratio.clamp(0.0, 1.0)


# Scalars that depend only on (step, T, ...) but that the peers compute with float32 torch ops:
# under torch.compile dynamo evaluates them once at trace time (a constant of the step),
# instead of turning float(tensor) into a data-dependent value that breaks fullgraph tracing.
@torch.compiler.assume_constant_result
def _linspace_f32_at(start: float, end: float, num_steps: int, index: int) -> float:
    """float32 torch.linspace(start, end, num_steps)[index], bit for bit as the peers use it."""
    return float(torch.linspace(start, end, num_steps)[index])


@torch.compiler.assume_constant_result
def _lucidrains_count(schedule: str, step: int, num_steps: int, seq_len: int) -> int:
    t_next = torch.linspace(0, 1, num_steps)[step + 1]
    return max(int((mask_ratio(schedule, t_next, total_tokens=seq_len) * seq_len).item()), 1)


def _as_counts(x, batch: int, device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.int64, device=device).expand(batch).clone()


def mask_count(
    rule: str,
    step: int,
    num_steps: int,
    *,
    masked_now: torch.Tensor,
    masked_start: torch.Tensor,
    seq_len: int,
    schedule: str = "cosine",
    starting_mask_ratio=1.0,
) -> torch.Tensor:
    """How many masked positions of each image stay masked after step ``step`` -> (B,) int64.

    ``masked_now``: (B,) masked positions before this step; ``masked_start``: (B,) before step 0
    (the result is on their device: no host sync in the decoding loop).
    Rules (each peer's; all give 0 at the last step, which fills every position):

    * ``maskgit`` (google-research/maskgit): floor(masked_start · γ(r)), clamped to
      [1, masked_now − 1];
    * ``amused`` (diffusers AmusedScheduler): floor(seq_len · (starting_mask_ratio · γ(r))) in
      float32, clamped to [1, masked_now − 1]; ``starting_mask_ratio`` < 1 for inpainting;
    * ``lucidrains`` (muse-maskgit-pytorch): the count its next step starts from,
      max(int(γ(t_{i+1}) · seq_len), 1) with t = linspace(0, 1, T) in float32; one count for the
      whole batch.
    """
    B, device = masked_now.shape[0], masked_now.device
    if not 0 <= step < num_steps:
        raise ValueError(f"step must lie in [0, num_steps={num_steps}), got {step}")
    if step == num_steps - 1:
        return torch.zeros(B, dtype=torch.int64, device=device)
    if rule == "lucidrains":
        return _as_counts(_lucidrains_count(schedule, step, num_steps, seq_len), B, device)
    r = _f32(step + 1) / num_steps
    ratio = mask_ratio(schedule, r, total_tokens=seq_len)
    if rule == "maskgit":
        count = torch.floor(masked_start.to(torch.float32) * ratio).to(torch.int64)
    elif rule == "amused":
        count = torch.floor(seq_len * (_f32(starting_mask_ratio) * ratio)).to(torch.int64)
        count = _as_counts(count, B, device)
    else:
        raise ValueError(f"mask count rule must be one of {MASK_COUNT_RULES}, got {rule!r}")
    return torch.maximum(torch.minimum(masked_now.to(torch.int64) - 1, count), torch.ones_like(count))


def check_guidance_scale(value, name: str = "guidance_scale") -> float:
    """A guidance scale as diffusers reads it: any finite number >= 0, where <= 1 means no
    classifier-free guidance (one branch). Negative or non-finite values are an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (<= 1: no guidance), got {value!r}")
    return float(value)


def uses_guidance(scale: float) -> bool:
    """diffusers' rule: classifier-free guidance runs only for a scale above 1."""
    return scale > 1.0


def guidance_scale_at(schedule: str, scale: float, step: int, num_steps: int,
                      interval: tuple[float, float] | None = None) -> float:
    """Guidance scale g of step ``step`` (convention l = lu + g (lc − lu); g = 1: no guidance).

    ``constant``: g; ``linear``: ramps from 1 at the first step to g at the last (the Muse
    paper's linearly increasing guidance t, with g = 1 + t); ``cosine``: the same ramp eased,
    1 + (g − 1)(1 − cos(π s)) / 2 with s = step / (T − 1); ``cosine_decay``: the reverse,
    from g at the first step down to 1 at the last, 1 + (g − 1)(1 + cos(π s)) / 2 (the
    annealed guidance of MaskGen / MaskBit).
    ``interval`` (a, b): guidance only on the steps whose middle, (step + ½) / T, lies in
    [a, b]; elsewhere g = 1 (the sampler then runs the conditional branch alone).
    """
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")
    if interval is not None:
        a, b = check_guidance_interval(interval)
        if not a <= (step + 0.5) / num_steps <= b:
            return 1.0
    if schedule == "constant" or num_steps == 1:
        return float(scale)
    s = step / (num_steps - 1)
    if schedule == "cosine_decay":
        ramp = (1 + math.cos(math.pi * s)) / 2
    else:
        ramp = s if schedule == "linear" else (1 - math.cos(math.pi * s)) / 2
    return 1.0 + (float(scale) - 1.0) * ramp


def check_guidance_interval(interval) -> tuple[float, float]:
    """(a, b) with 0 <= a <= b <= 1, as floats; a clear error otherwise."""
    try:
        a, b = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be a pair (a, b) of fractions of the decoding, got {interval!r}") from None
    if not 0.0 <= a <= b <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= a <= b <= 1, got {interval!r}")
    return a, b


def choice_temperature_at(schedule: str, value, step: int, num_steps: int) -> float:
    """Scale of the confidence noise at step ``step``.

    ``constant``: value; ``linear``: ``value = (start, end)`` spaced as float32
    torch.linspace(start, end, T) (aMUSEd: (2, 0)); ``maskgit``: value · (1 − r) (MaskGIT: 4.5).
    """
    if schedule == "constant":
        return float(value)
    if schedule == "linear":
        start, end = value if isinstance(value, (tuple, list)) else (value, 0.0)
        return _linspace_f32_at(float(start), float(end), num_steps, step)
    if schedule == "maskgit":
        return float(value) * (1.0 - (step + 1) / num_steps)
    raise ValueError(f"choice temperature schedule must be one of {CHOICE_SCHEDULES}, got {schedule!r}")


def temperature_at(schedule: str, value: float, step: int, num_steps: int) -> float:
    """Sampling temperature tau of step ``step``: ``constant``, or ``lucidrains``'s annealing
    value · (steps left) / T = value · (T − 1 − step) / T, which reaches 0 (argmax) at the end."""
    if schedule == "constant":
        return float(value)
    if schedule == "lucidrains":
        return float(value) * (num_steps - 1 - step) / num_steps
    raise ValueError(f"temperature schedule must be one of {TEMPERATURE_SCHEDULES}, got {schedule!r}")
