"""Reference (definition) of one MaskGIT decoding step: CFG + sampling + confidence + re-masking.

For image b and a *masked* position n, with float32 arithmetic throughout:

1. guided logits ``l = lu + g * (lc - lu)`` (computed as written, in float32); no guidance
   (``l = lc``) when ``uncond_logits`` is None or ``g == 1``.
   **NaN policy**: a NaN guided logit is treated as ``-inf`` (the token is never sampled and
   has zero probability) and ``+inf`` is clamped to the largest float32. So a row with some
   NaN logits samples among its other tokens; a row with *no* usable logit (all NaN/-inf) is
   "dead": it gets token 0 and confidence ``-inf``, so it is the first to stay masked. NaN
   logits at known positions are never read. The op never raises on NaN (that would cost a
   device sync per step) and never returns NaN confidence.
2. top-k filter (``top_k`` not None and < K): a token is kept when ``l >= t``, t the k-th
   largest logit of the row (ties at t are all kept). Sampling:
   ``x = argmax_k (l_k * (1/tau) + G_k)`` over kept tokens (Gumbel-max = a draw from
   softmax(l / tau) restricted to the kept tokens), with ``1/tau`` rounded to float32 once and
   G the Philox Gumbel noise of stream 0 (musefast.reference.philox); ``tau = 0``: ``x =
   argmax_k l_k``. argmax returns the lowest index among equal maxima.
3. confidence from the *unfiltered* guided logits at temperature 1:
   ``lp = (l_x - m) - log(sum_k exp(l_k - m))``, m the row max; ``c = lp`` (``confidence=
   "logprob"``) or ``c = exp(lp)`` (``"prob"``), plus ``choice_temperature * G'`` with G' the
   Gumbel noise of stream 1. Known positions: ``c = +inf``; they keep their token.
4. per image, ``n_b = clamp(num_to_mask_b, 0, #masked_b)`` positions with the lowest ``c``
   stay masked; ties are broken by the lowest position index.

Returns ``(tokens, masked)``: ``tokens`` holds the sampled token at *every* position that was
masked on input (also those that stay masked: the step's prediction of the full image) and the
input token elsewhere; ``masked`` marks the positions that stay masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from musefast.reference import philox

FLOAT32_MAX = torch.finfo(torch.float32).max
CONFIDENCES = ("logprob", "prob")
_CHUNK_ELEMENTS = 1 << 22  # rows × K per chunk: bounds the reference's memory


@dataclass
class StepTrace:
    """Per-position internals of one step (tests use them to count near-ties).

    All (B, N); entries at known positions are: sample = input token, best = 0, margin = +inf,
    logprob = 0, confidence = +inf.
    """

    sample: torch.Tensor  # int64: the sampled token
    best: torch.Tensor  # float32: the best decision value (l / tau + G, or l when tau = 0)
    margin: torch.Tensor  # float32: best minus second-best decision value (+inf if only one)
    logprob: torch.Tensor  # float32: log softmax(l)[sample]
    confidence: torch.Tensor  # float32: c (+inf at known positions)
    tokens: torch.Tensor  # int64: the output tokens
    masked: torch.Tensor  # bool: the output mask


def guided_logits(logits: torch.Tensor, uncond_logits: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """Step 1 incl. the NaN policy: float32 guided logits, NaN -> -inf, +inf -> max float32."""
    cond = logits.float()
    if uncond_logits is not None and guidance_scale != 1.0:
        uncond = uncond_logits.float()
        g = torch.tensor(guidance_scale, dtype=torch.float32)
        cond = uncond + g * (cond - uncond)
    cond = torch.where(torch.isnan(cond), float("-inf"), cond)
    return cond.clamp(max=FLOAT32_MAX)


def topk_keep(l: torch.Tensor, top_k: int | None) -> torch.Tensor | None:
    """(R, K) bool of tokens kept by the top-k filter, or None when it keeps everything."""
    if top_k is None or top_k >= l.shape[-1]:
        return None
    threshold = torch.topk(l, top_k, dim=-1).values[:, -1:]
    return l >= threshold


def _top2(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best value, best minus second best) per row."""
    if v.shape[-1] < 2:
        return v[:, 0], torch.full(v.shape[:-1], float("inf"), device=v.device)
    top2 = torch.topk(v, 2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    # equal infinities (or both -inf) are exact ties: margin 0
    return top2[:, 0], torch.where(torch.isnan(margin), 0.0, margin)


def sample_rows(
    l: torch.Tensor, keep: torch.Tensor | None, temperature: float, gumbel: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 2 on (R, K) guided logits -> (sampled token, best decision value, its margin), (R,)."""
    if temperature == 0:
        v = l
    else:
        inv_tau = torch.tensor(1.0 / temperature, dtype=torch.float32)
        v = l * inv_tau + gumbel
        if keep is not None:
            v = torch.where(keep, v, float("-inf"))
    return (v.argmax(dim=-1), *_top2(v))


def log_softmax_at(l: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Step 3: (l_x - m) - log(sum exp(l - m)) per row, -inf for dead rows (all -inf)."""
    m = l.amax(dim=-1, keepdim=True)
    dead = m[:, 0] == float("-inf")
    m = torch.where(dead[:, None], 0.0, m)
    s = torch.exp(l - m).sum(dim=-1)
    lp = (l.gather(1, index[:, None])[:, 0] - m[:, 0]) - torch.log(s)
    return torch.where(dead, float("-inf"), lp)


def select_stay_masked(confidence: torch.Tensor, masked: torch.Tensor, num_to_mask: torch.Tensor) -> torch.Tensor:
    """Step 4: (B, N) bool, True at the clamped num_to_mask lowest confidences of each image."""
    n = torch.minimum(num_to_mask.clamp(min=0), masked.sum(dim=1))
    order = torch.sort(confidence, dim=1, stable=True).indices  # lowest index first on ties
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(confidence.shape[1], device=order.device).expand_as(order).contiguous())
    return (rank < n[:, None]) & masked


def step_trace(
    logits: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    *,
    tokens: torch.Tensor,
    masked: torch.Tensor,
    num_to_mask: torch.Tensor,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    choice_temperature: float = 0.0,
    top_k: int | None = None,
    confidence: str = "logprob",
    seed: int,
    step: int,
    choice_noise: torch.Tensor | None = None,
) -> StepTrace:
    """The whole step with its internals. Inputs as validated by ``ops.cfg_sample_remask``:
    logits (B, N, K), tokens (B, N) int64, masked (B, N) bool, num_to_mask (B,) int64 (CPU).

    ``choice_noise`` (B, N) replaces the Philox confidence noise G' (tests feed a peer's noise).
    """
    B, N, K = logits.shape
    device = logits.device
    sample = tokens.clone()
    best = torch.zeros(B, N, device=device)
    margin = torch.full((B, N), float("inf"), device=device)
    logprob = torch.zeros(B, N, device=device)
    rows_b, rows_n = masked.nonzero(as_tuple=True)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, K))
    for start in range(0, rows_b.numel(), chunk):
        b, n = rows_b[start : start + chunk], rows_n[start : start + chunk]
        l = guided_logits(logits[b, n], None if uncond_logits is None else uncond_logits[b, n], guidance_scale)
        gumbel = None if temperature == 0 else philox.sample_gumbel(seed, step, b, n, K).to(device)
        x, best[b, n], margin[b, n] = sample_rows(l, topk_keep(l, top_k), temperature, gumbel)
        sample[b, n], logprob[b, n] = x, log_softmax_at(l, x)
    if choice_temperature != 0 and choice_noise is None:
        choice_noise = philox.choice_gumbel(seed, step, B, N, device)
    conf, stay = remask_from_logprob(logprob, masked, num_to_mask, choice_temperature, choice_noise, confidence)
    return StepTrace(sample, best, margin, logprob, conf, sample, stay)


def remask_from_logprob(
    logprob: torch.Tensor,
    masked: torch.Tensor,
    num_to_mask: torch.Tensor,
    choice_temperature: float,
    choice_noise: torch.Tensor | None,
    confidence: str = "logprob",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4 from the sampled tokens' log-probabilities (B, N) -> (confidence, stay masked).

    ``choice_noise`` (B, N) is the Gumbel noise G' (needed when choice_temperature != 0).
    """
    conf = logprob if confidence == "logprob" else torch.exp(logprob)
    if choice_temperature != 0:
        conf = conf + torch.tensor(choice_temperature, dtype=torch.float32) * choice_noise
    conf = torch.where(logprob == float("-inf"), float("-inf"), conf)  # probability 0 / dead rows first
    conf = torch.where(masked, conf, float("inf"))
    return conf, select_stay_masked(conf, masked, num_to_mask.to(conf.device))


def cfg_sample_remask(logits, uncond_logits=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The step (see the module docstring) -> (tokens (B, N) int64, masked (B, N) bool)."""
    trace = step_trace(logits, uncond_logits, **kwargs)
    return trace.tokens, trace.masked
