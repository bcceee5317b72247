"""The step cache: cheap decoding steps that reuse the K/V of tokens already decoded.

ReCAP (arXiv 2505.19089) alternates full steps with cheap ones; Lumina-DiMOO's ML-Cache
recomputes only the least confident tokens between refreshes. Here:

* a **full step** runs the whole transformer on every token and records each self-attention
  layer's K/V (:class:`musefast.nn.row_cache.KVStore`, one (K, V) pair per layer); it happens
  at the first step of a call, every ``refresh`` steps, and whenever the guided branch is
  needed but the record holds only the conditional one;
* a **cheap step** runs the per-token work only for some rows — always the tokens decoded at
  the previous step (their input changed from [MASK] to a token, so their K/V must follow),
  plus, for ``recompute="masked"``, every token still masked, or for
  ``recompute="lowest_confidence"``, the ``fraction`` of the masked tokens whose last computed
  prediction was least confident (the others reuse their last logits). Their queries attend
  to all keys: the recorded K/V, updated in place at the recomputed rows.

``refresh=1`` makes every step full: the tokens are those of the exact sampler. The cache is
opt-in (``cache=None`` is exact) and lives for one sampler call: nothing is shared between
calls, and rows of one image never touch another image's K/V.

:class:`GuidedForward` is what the sampler calls: a model with its per-generation context(s),
able to run the conditional branch alone (guidance off on a step: the batch halves) or both
branches batched, on all rows or on a subset with a K/V store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_map

from musefast.nn.row_cache import KVStore, rows_from_mask, scatter_rows_
from musefast.sampling.schedules import check_guidance_interval

RECOMPUTE_RULES = ("masked", "lowest_confidence")


@dataclass(frozen=True)
class StepCache:
    """Settings of the step cache.

    Args:
        refresh: a full step every ``refresh`` steps (1 = every step: exact).
        recompute: which rows a cheap step computes: ``"masked"`` (every masked token) or
            ``"lowest_confidence"`` (the least confident ``fraction`` of them); both also
            recompute the tokens decoded at the previous step.
        fraction: share of the masked tokens recomputed by ``"lowest_confidence"``, in (0, 1].
        guidance_interval: the guidance interval (a, b) this setting goes with, used when the
            call names none (None: guidance on every step, as without the cache).
    """

    refresh: int = 3
    recompute: str = "masked"
    fraction: float = 0.25
    guidance_interval: tuple | None = None

    def __post_init__(self):
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
            raise ValueError(f"StepCache.refresh must be an int >= 1, got {self.refresh!r}")
        if self.recompute not in RECOMPUTE_RULES:
            raise ValueError(f"StepCache.recompute must be one of {RECOMPUTE_RULES}, got {self.recompute!r}")
        if not isinstance(self.fraction, (int, float)) or not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"StepCache.fraction must lie in (0, 1], got {self.fraction!r}")
        if self.guidance_interval is not None:
            check_guidance_interval(self.guidance_interval)


# Chosen by scripts/eval_step_cache.py (docs/performance.md, "Step cache"): of the settings measured on the
# real-size aMUSEd architecture, the one with the fewest transformer FLOPs per image whose
# demo checker scores stay within 1 point of exact ("lowest_confidence" settings lose 5+
# points of shape accuracy there).
FAST = StepCache(refresh=3, recompute="masked", guidance_interval=(0.0, 0.5))
CACHE_PRESETS = {"fast": FAST}


def resolve_cache(cache) -> StepCache | None:
    """None | "fast" | StepCache -> StepCache or None."""
    if cache is None or isinstance(cache, StepCache):
        return cache
    if isinstance(cache, str) and cache in CACHE_PRESETS:
        return CACHE_PRESETS[cache]
    raise ValueError(f"cache must be None, one of {sorted(CACHE_PRESETS)} or a musefast.StepCache, got {cache!r}")


def batch_slice(tree, sl: slice):
    """Every tensor of a context (nested tuples, lists, NamedTuples) restricted to batch rows ``sl``."""
    return tree_map(lambda t: t[sl] if isinstance(t, torch.Tensor) else t, tree)


class GuidedForward:
    """tokens -> (cond logits, uncond logits or None) for the sampler.

    Args:
        model: called as ``model(tokens, context=..., kv_store=..., rows=...)`` (MuseTransformer,
            SuperResTransformer, UVit2D).
        cond_context: the model's prepared context of the conditional branch (batch B).
        cfg_context: context of both branches batched (2B), or None (no guidance).
        uncond_first: the order of the branches in ``cfg_context`` (aMUSEd: unconditional first).
    """

    def __init__(self, model, cond_context, cfg_context=None, *, uncond_first: bool = False):
        self.model, self.cond_context, self.cfg_context = model, cond_context, cfg_context
        self.uncond_first = uncond_first

    @property
    def has_uncond(self) -> bool:
        return self.cfg_context is not None

    def cond_half(self, batch: int) -> slice:
        """Where the conditional rows sit in a batch of both branches (of 2·batch rows)."""
        return slice(batch, 2 * batch) if self.uncond_first else slice(0, batch)

    def __call__(self, tokens: torch.Tensor, *, cfg: bool = True, kv_store: KVStore | None = None,
                 rows: torch.Tensor | None = None):
        """``cfg``: run the unconditional branch too (when this forward has one)."""
        kw = {} if kv_store is None else dict(kv_store=kv_store, rows=rows)
        if not (cfg and self.has_uncond):
            return self.model(tokens, context=self.cond_context, **kw), None
        if rows is not None:
            kw["rows"] = torch.cat([rows, rows])
        first, second = self.model(torch.cat([tokens, tokens]), context=self.cfg_context, **kw).chunk(2)
        return (second, first) if self.uncond_first else (first, second)


def _confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max log-probability of each position's prediction: (..., K) -> (...) float32."""
    logits = logits.float()
    return logits.amax(dim=-1) - torch.logsumexp(logits, dim=-1)


class CacheRun:
    """The cache of one sampler call: decides full vs cheap steps and which rows to recompute.

    ``__call__(model_in, masked, cfg)`` -> (cond, uncond) logits (B, N, K) for the step, with
    ``masked`` (B, N) the positions still masked before it.
    """

    def __init__(self, config: StepCache, forward: GuidedForward):
        self.config, self.forward = config, forward
        self.store: KVStore | None = None
        self.store_has_uncond = False
        self.steps_since_full = 0
        self.prev_masked: torch.Tensor | None = None
        self.logits: list | None = None  # lowest_confidence: last logits [cond, uncond] (B, N, K)
        self.confidence: torch.Tensor | None = None
        self.full_steps = self.cheap_steps = 0
        self.rows_computed = 0  # image rows run through the transformer by cheap steps (per branch)
        self.peak_bytes = 0

    def _needs_full(self, cfg: bool) -> bool:
        return (self.store is None or self.steps_since_full >= self.config.refresh
                or (cfg and self.forward.has_uncond and not self.store_has_uncond))

    def __call__(self, model_in: torch.Tensor, masked: torch.Tensor, cfg: bool):
        cfg = cfg and self.forward.has_uncond
        if self._needs_full(cfg):
            out = self._full(model_in, cfg)
        else:
            out = self._cheap(model_in, masked, cfg)
        self.prev_masked = masked
        self.peak_bytes = max(self.peak_bytes, self.memory_bytes())
        return out

    def _full(self, model_in, cfg):
        self.store = self.logits = self.confidence = None  # free the old record before the new one
        store = KVStore()
        cond, uncond = self.forward(model_in, cfg=cfg, kv_store=store)
        self.store, self.store_has_uncond, self.steps_since_full = store, cfg, 1
        if self.config.recompute == "lowest_confidence":
            B = model_in.shape[0]
            self.logits = [cond.reshape(B, -1, cond.shape[-1]), None if uncond is None else
                           uncond.reshape(B, -1, uncond.shape[-1])]
            self.confidence = _confidence(self.logits[0])
        self.full_steps += 1
        return cond, uncond

    def _cheap(self, model_in, masked, cfg):
        B, N = masked.shape
        selected = self.prev_masked & ~masked  # decoded at the previous step: their K/V must follow
        if self.config.recompute == "masked":
            selected = selected | masked
        else:
            selected = selected | self._least_confident(masked)
        rows = rows_from_mask(selected)
        if self.store_has_uncond and not cfg:  # keep (and update) the conditional half only
            self.store = self.store.batch(self.forward.cond_half(B))
            self.store_has_uncond = False
            if self.logits is not None:
                self.logits[1] = None
        cond_rows, uncond_rows = self.forward(model_in, cfg=cfg, kv_store=self.store, rows=rows)
        self.steps_since_full += 1
        self.cheap_steps += 1
        self.rows_computed += rows.numel()
        if self.logits is None:  # "masked": every masked row was recomputed; the rest are known
            return tuple(None if r is None else scatter_rows_(r.new_zeros(B, N, r.shape[-1]), rows, r)
                         for r in (cond_rows, uncond_rows))
        for i, r in enumerate((cond_rows, uncond_rows)):
            if r is not None:
                scatter_rows_(self.logits[i], rows, r)
        self.confidence.scatter_(1, rows, _confidence(cond_rows))
        return self.logits[0], self.logits[1]

    def _least_confident(self, masked: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: per image, the ceil(fraction · #masked) masked positions of lowest confidence."""
        counts = torch.ceil(masked.sum(dim=1) * self.config.fraction).to(torch.int64)
        kmax = int(counts.max())
        chosen = torch.zeros_like(masked)
        if kmax == 0:
            return chosen
        score = self.confidence.masked_fill(~masked, math.inf)
        idx = score.topk(kmax, dim=1, largest=False).indices
        keep = torch.arange(kmax, device=masked.device)[None, :] < counts[:, None]
        return chosen.scatter_(1, idx, keep)

    def memory_bytes(self) -> int:
        """Bytes the cache holds now: recorded K/V and model state, cached logits and confidences."""
        total = 0 if self.store is None else self.store.nbytes()
        for t in (self.logits or []) + [self.confidence]:
            if t is not None:
                total += t.numel() * t.element_size()
        return total
