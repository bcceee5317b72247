"""``Engine``: requests in, one batched forward per step across requests, tokens out.

Each :meth:`Engine.step` admits queued requests (up to ``max_batch`` in flight), runs one
forward per group of in-flight requests whose shapes fit together — rows at different steps,
with and without guidance, the unconditional row only where a request uses guidance at its
step — and then each request's own decoding step (``ops.cfg_sample_remask`` keyed by the
request's seed and step, through :meth:`MaskGitSampler.step`, the code the pipelines run).
Requests join and leave at step boundaries. A request's contexts are prepared for it alone
(as a one-image pipeline call prepares them) and every row of a forward depends only on its
own inputs, so its tokens do not depend on its batch-mates (scripts/engine_invariance.py
measures it). Requests with the step cache keep their own key/value record and run their
forward alone.
"""
from __future__ import annotations

import collections
import enum

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from musefast.generation.adapters import Adapter, Stage, adapter_for
from musefast.generation.request import Request
from musefast.ops.registry import use_backend
from musefast.sampling import GuidedForward, uses_guidance
from musefast.sampling.schedules import guidance_scale_at


class QueueFull(RuntimeError):
    """``submit`` on a full queue: retry after some requests finished (a server answers 429)."""


class Cancelled(RuntimeError):
    """``result()`` of a cancelled request."""


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Handle:
    """A submitted request: its state, progress, preview and result."""

    def __init__(self, engine: "Engine", request: Request | None, stage: Stage | None = None, on_step=None):
        self.engine, self.request = engine, request
        self.state = State.QUEUED
        self.stage: Stage | None = None
        self._prepared = stage  # a job a pipeline prepared itself (request is None then)
        self._on_step = on_step
        self.steps_done = 0
        self._tokens: torch.Tensor | None = None
        self.error: BaseException | None = None  # why a FAILED request failed

    @property
    def rows(self) -> int:
        """Rows this job decodes (1 for a request; the images of a pipeline call)."""
        return 1 if self._prepared is None else self._prepared.rows

    def done(self) -> bool:
        return self.state in (State.DONE, State.FAILED, State.CANCELLED)

    def result(self) -> torch.Tensor:
        """The final tokens, (h, w) int64 for a request ((B, h, w) for a prepared job of B
        rows); steps the engine until this request is done."""
        while not self.done():
            self.engine.step()
        if self.state is State.CANCELLED:
            raise Cancelled("this request was cancelled")
        if self.state is State.FAILED:
            raise self.error
        return self._tokens

    def image(self):
        """The final image (PIL)."""
        from musefast.pipelines.images import format_output

        tokens = self.result()
        kind = "base" if self.stage is None else self.stage.kind
        return format_output(self.engine.adapter.decode(tokens.reshape(-1, *tokens.shape[-2:]), kind), "pil")[0]

    def cancel(self) -> bool:
        """Drop the request (queued or in flight; it leaves at the next step boundary). -> False
        when it had already finished."""
        if self.done():
            return False
        self.engine._drop(self)
        self.state = State.CANCELLED
        return True

    @torch.no_grad()
    def preview(self) -> torch.Tensor | None:
        """The image (3, H, W) in [0, 1] decoded from the current tokens (every position holds
        the latest prediction), or None before the first step; (B, 3, H, W) for a prepared
        job of B rows."""
        if self.state is State.DONE:
            tokens, kind = self._tokens, self.stage.kind
        elif self.stage is None or self.steps_done == 0:
            return None
        else:
            tokens, kind = self.stage.tokens.reshape(self.stage.rows, *self.stage.grid), self.stage.kind
            tokens = tokens[0] if self._prepared is None else tokens
        images = self.engine.adapter.decode(tokens.reshape(-1, *tokens.shape[-2:]), kind)
        return images[0] if self._prepared is None else images


class _Logits(GuidedForward):
    """A step's logits, computed by the engine's batched forward, handed to MaskGitSampler.step."""

    def __init__(self, cond, uncond):
        super().__init__(None, None)
        self.logits = (cond, uncond)

    def __call__(self, tokens, *, cfg=True, **kw):
        return self.logits


class Engine:
    """Step-level batching of requests on one model.

    Args:
        model: a loaded pipeline (``musefast.load(...)``) or an adapter.
        max_batch: rows in flight — one per request, B per prepared job of B images (a forward
            holds at most 2 · max_batch rows: with guidance); a job larger than max_batch runs alone.
        max_queue: requests waiting; ``submit`` beyond it raises :class:`QueueFull`.
        backend: the ``backend=`` of every op (None: the best available).
        model_name: what the requests' metadata names as the model.
    """

    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 1024, backend: str | None = None,
                 model_name: str | None = None):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.adapter: Adapter = adapter_for(model)
        self.max_batch, self.max_queue, self.backend = max_batch, max_queue, backend
        self.model_name = model_name
        self._queue: collections.deque[Handle] = collections.deque()
        self._live: list[Handle] = []
        self.forwards = 0  # batched forwards run (for reports)

    # -- requests ----------------------------------------------------------------------------

    def resolve(self, request: Request) -> Request:
        """``request`` with the family's defaults filled in (what ``submit`` queues)."""
        if not isinstance(request, Request):
            raise TypeError(f"expected a musefast.generation.Request, got {type(request).__name__}")
        return self.adapter.resolve(request, self.model_name)

    def submit(self, request: Request) -> Handle:
        """Queue ``request`` (checked and resolved against the family's defaults now)."""
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"the engine's queue holds {self.max_queue} requests: wait for some to finish")
        handle = Handle(self, self.resolve(request))
        self._queue.append(handle)
        return handle

    def submit_stage(self, stage: Stage, *, on_step=None) -> Handle:
        """Queue a job the caller prepared: a :class:`Stage` of B rows (a pipeline call's images,
        contexts and initial tokens prepared as the pipeline prepares them). ``on_step(stage)``
        runs after each of its steps and may replace ``stage.tokens`` (diffusers' step
        callbacks); the job ends with its stage (``result()`` -> (B, h, w))."""
        if not isinstance(stage, Stage):
            raise TypeError(f"expected a musefast.generation.adapters.Stage, got {type(stage).__name__}")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"the engine's queue holds {self.max_queue} requests: wait for some to finish")
        handle = Handle(self, None, stage, on_step)
        self._queue.append(handle)
        return handle

    def run(self, requests) -> list[Handle]:
        """Submit every request (stepping while the queue is full) and step until all are done."""
        handles = []
        for request in requests:
            while len(self._queue) >= self.max_queue:
                self.step()
            handles.append(self.submit(request))
        while self.busy:
            self.step()
        return handles

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._live)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _drop(self, handle: Handle) -> None:
        if handle in self._queue:
            self._queue.remove(handle)
        if handle in self._live:
            self._live.remove(handle)

    # -- stepping ----------------------------------------------------------------------------

    def _admit(self) -> None:
        rows = sum(h.rows for h in self._live)
        while self._queue and (not self._live or rows + self._queue[0].rows <= self.max_batch):
            handle = self._queue.popleft()
            try:
                handle.stage = handle._prepared or self.adapter.start(handle.request, None)
            except Exception as exc:  # noqa: BLE001 - a request that cannot start fails alone
                handle.state, handle.error = State.FAILED, exc
                continue
            handle.state = State.RUNNING
            self._live.append(handle)
            rows += handle.rows

    @torch.no_grad()
    def step(self) -> int:
        """Admit queued requests, advance every in-flight request by one step; -> how many ran."""
        with use_backend(self.backend):
            self._admit()
            live = list(self._live)
            groups: dict[tuple, list[Handle]] = {}
            for handle in live:
                if handle.stage.cache_run is not None:
                    self._step_alone(handle)
                else:
                    groups.setdefault(_group_key(handle.stage), []).append(handle)
            for members in groups.values():
                self._step_group(members)
            for handle in live:
                self._advance(handle)
        return len(live)

    def _step_group(self, members: list[Handle]) -> None:
        contexts, tokens, steps, totals, spans = [], [], [], [], []
        for handle in members:
            st = handle.stage
            guided = _guided(st)
            model_in = st.tokens.masked_fill(st.masked, st.mask_token_id).reshape(st.shape)
            copies = 2 if guided else 1  # a guided context holds both branches, each over the job's rows
            contexts.append(st.forward.cfg_context if guided else st.forward.cond_context)
            tokens += [model_in] * copies
            steps += [st.step] * (copies * st.rows)
            totals += [st.num_steps] * (copies * st.rows)
            spans.append((guided, copies * st.rows))
        out = self.adapter.run(members[0].stage.kind, torch.cat(tokens), _cat_contexts(contexts), steps, totals)
        self.forwards += 1
        at = 0
        for handle, (guided, rows) in zip(members, spans):
            part = out[at:at + rows]
            at += rows
            if guided:
                first, second = part[:rows // 2], part[rows // 2:]
                cond, uncond = (second, first) if handle.stage.forward.uncond_first else (first, second)
            else:
                cond, uncond = part, None
            self._sample(handle, _Logits(cond, uncond))

    def _step_alone(self, handle: Handle) -> None:
        self._sample(handle, handle.stage.forward, handle.stage.cache_run)
        self.forwards += 1

    def _sample(self, handle: Handle, logits: GuidedForward, run=None) -> None:
        st = handle.stage
        st.tokens, st.masked = st.sampler.step(
            logits, st.tokens, st.masked, shape=st.shape, step=st.step, seed=st.seed,
            mask_token_id=st.mask_token_id, masked_start=st.masked_start,
            starting_mask_ratio=st.starting_mask_ratio, run=run)

    def _advance(self, handle: Handle) -> None:
        if handle.state is not State.RUNNING:  # cancelled during the step
            return
        st = handle.stage
        if handle._on_step is not None:
            try:
                handle._on_step(st)
            except Exception as exc:  # noqa: BLE001 - the caller's hook failed: this job ends with its error
                self._live.remove(handle)
                handle.state, handle.error = State.FAILED, exc
                return
        st.step += 1
        handle.steps_done += 1
        if not st.done:
            return
        if handle._prepared is not None:  # a prepared job ends with its stage
            following, grid_tokens = None, st.tokens.reshape(st.rows, *st.grid)
        else:
            grid_tokens = st.tokens.reshape(st.grid)
            try:
                following = self.adapter.next_stage(handle.request, st, grid_tokens)
            except Exception as exc:  # noqa: BLE001
                following, handle.error, handle.state = None, exc, State.FAILED
        if following is not None:
            handle.stage = following
            return
        self._live.remove(handle)
        if handle.state is State.RUNNING:
            handle._tokens, handle.state = grid_tokens, State.DONE


def _guided(stage: Stage) -> bool:
    """Whether ``stage`` runs the unconditional branch at its step (MaskGitSampler.step's rule)."""
    p = stage.sampler.preset
    return (stage.forward.has_uncond and stage.sampler.use_guidance and uses_guidance(
        guidance_scale_at(p.guidance_schedule, p.guidance_scale, stage.step, p.num_steps, p.guidance_interval)))


def _group_key(stage: Stage) -> tuple:
    """Requests whose rows can share a forward: one model, one token shape, one context layout."""
    leaves, spec = tree_flatten(stage.forward.cond_context)
    layout = tuple((tuple(t.shape[1:]), t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in leaves)
    return stage.kind, tuple(stage.shape[1:]), str(spec), layout


def _cat_contexts(contexts: list):
    """Contexts of one layout (each for its own rows) -> one context of all rows, in order."""
    if len(contexts) == 1:
        return contexts[0]
    flat = [tree_flatten(c) for c in contexts]
    spec = flat[0][1]
    leaves = [torch.cat(parts) if isinstance(parts[0], torch.Tensor) else parts[0]
              for parts in zip(*(leaves for leaves, _ in flat))]
    return tree_unflatten(leaves, spec)
