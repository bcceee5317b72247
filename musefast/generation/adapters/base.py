"""What the engine asks of a model family: the protocol every adapter implements.

An adapter wraps a loaded pipeline and answers, for one :class:`Request`: its defaults
(:meth:`Adapter.resolve`), its text encoding, token grid and initial tokens (all in
:meth:`Adapter.start`, which returns the first :class:`Stage`), the forward over a batch of
rows whose contexts were prepared one request at a time (:meth:`Adapter.run`), a next stage
(super-resolution) and the decoder. Contexts are prepared exactly as the family's pipeline
prepares them for a call with this one image, so the engine's tokens equal the pipeline's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from musefast.generation.request import Request
from musefast.sampling import GuidedForward, MaskGitSampler
from musefast.sampling.cache import CacheRun


@dataclass(eq=False)
class Stage:
    """One decoding stage of one request: what the scheduler steps.

    ``forward`` holds the prepared contexts (conditional, and both branches when guidance is
    used) and the model the step cache calls; ``sampler`` the preset of each step;
    ``tokens``/``masked`` are flat (B, N) — one row for a request, B rows for the images of one
    pipeline call, which decode in lock-step under one seed (or one seed per row), exactly as
    ``MaskGitSampler`` decodes a batch; ``shape`` the model's token input shape (B, ...);
    ``grid`` the (h, w) of one image; ``kind`` names the model of the stage (rows of one kind,
    shape and context layout share a forward).
    """

    kind: str
    forward: GuidedForward
    sampler: MaskGitSampler
    tokens: torch.Tensor
    masked: torch.Tensor
    shape: tuple
    grid: tuple
    mask_token_id: int
    seed: int
    step: int = 0
    starting_mask_ratio: object = None
    masked_start: torch.Tensor = field(init=False)
    cache_run: CacheRun | None = field(init=False, default=None)

    def __post_init__(self):
        rows = self.tokens.shape[0]
        if isinstance(self.seed, (list, tuple)) and len(self.seed) != rows:
            raise ValueError(f"seed has {len(self.seed)} entries for a batch of {rows} images")
        self.tokens = self.tokens.reshape(rows, -1).clone()
        self.masked = self.masked.reshape(rows, -1).clone()
        self.masked_start = self.masked.sum(dim=1)
        if self.starting_mask_ratio is None:  # as MaskGitSampler: the masked share of the image
            self.starting_mask_ratio = self.masked_start.sum() / self.masked.numel()
        if self.sampler.cache is not None:
            self.cache_run = CacheRun(self.sampler.cache, self.forward)

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_steps(self) -> int:
        return self.sampler.preset.num_steps

    @property
    def done(self) -> bool:
        return self.step >= self.num_steps


class Adapter:
    """Base of the per-family adapters (see the module docstring)."""

    family: str = ""

    def __init__(self, pipe):
        self.pipe = pipe

    # -- requests ----------------------------------------------------------------------------

    def defaults(self, request: Request) -> dict:
        """The family's values of the settings ``request`` leaves as None."""
        raise NotImplementedError

    def resolve(self, request: Request, model: str | None = None) -> Request:
        """``request`` with every setting filled (the family's defaults) and its family named;
        a request the family cannot run is a ValueError."""
        if request.family not in (None, self.family):
            raise ValueError(f"request is for the {request.family!r} family, this model is {self.family!r}")
        filled = {k: v for k, v in self.defaults(request).items() if getattr(request, k) is None}
        if model is not None and request.model is None:
            filled["model"] = model
        return request.replace(family=self.family, **filled)

    # -- decoding ----------------------------------------------------------------------------

    def start(self, request: Request, backend: str | None = None) -> Stage:
        """The first stage of a resolved request: text encoded, contexts prepared, tokens set."""
        raise NotImplementedError

    def next_stage(self, request: Request, stage: Stage, tokens: torch.Tensor) -> Stage | None:
        """The stage after ``stage`` finished with ``tokens`` (grid), or None: the request is done."""
        return None

    def run(self, kind: str, tokens: torch.Tensor, context, steps: list[int], num_steps: list[int]) -> torch.Tensor:
        """Logits (rows, ..., K) of ``tokens`` (rows, ...) under ``context`` (rows of many
        requests, concatenated); ``steps``/``num_steps``: each row's step (families whose model
        takes the timestep read them)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, kind: str = "base") -> torch.Tensor:
        """Tokens (B, h, w) -> images (B, 3, H, W) float in [0, 1]."""
        return self.pipe.decode(tokens).float().clamp(0, 1)

    def sampler_label(self) -> str:
        """The decoding's name in the PNG metadata (the family and the pipeline's sampler)."""
        return f"{self.family}-{self.pipe.sampler}"

    def components(self) -> dict:
        """name -> module of every weight-holding component (what determines the images)."""
        raise NotImplementedError
