"""The engine thread: the only code that touches the :class:`~musefast.generation.Engine`.

The engine is not thread-safe, so HTTP handlers never call it. A handler hands a :class:`Job`
(the requests of one HTTP call) to :meth:`EngineWorker.submit`; the thread admits it at the
next step boundary (all of its images or none: a full queue rejects the job whole), steps while
anything is in flight, and reports each image, preview and failure back to the handler's
event loop as :class:`Event` objects on the job's asyncio queue. ``cancel`` (client gone,
timeout, shutdown) takes effect at the next step boundary too.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from musefast.generation import Engine, QueueFull, Request, State


@dataclass
class Event:
    """What the engine thread tells a handler: ``kind`` is "accepted", "rejected" (error: the
    QueueFull or the drain), "preview" (index: the image, partial: its 0-based preview number,
    image: (3, H, W) in [0, 1]), "image" (image: PIL) or "failed" (error)."""

    kind: str
    index: int = -1
    image: Any = None
    partial: int = -1
    error: BaseException | None = None


@dataclass(eq=False)
class Job:
    """The images of one HTTP request; ``partial_images`` previews per image (0: none)."""

    requests: list[Request]
    loop: asyncio.AbstractEventLoop
    partial_images: int = 0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    handles: list = field(default_factory=list)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when its first image was admitted
    _previews: list = field(default_factory=list)  # per image: the steps after which to decode one
    _sent: list = field(default_factory=list)  # per image: previews sent so far
    _open: set = field(default_factory=set)  # indices of images not yet reported

    def post(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def preview_steps(total: int, partial_images: int) -> list[int]:
    """Steps (1-based counts of steps done) after which a preview is decoded: ``partial_images``
    of them spread evenly over ``total`` steps, never the last (the final image follows it);
    fewer when the request has too few steps, as OpenAI's API allows."""
    if partial_images <= 0 or total <= 1:
        return []
    steps = {max(1, min(total - 1, round(total * (i + 1) / (partial_images + 1)))) for i in range(partial_images)}
    return sorted(steps)


class EngineWorker:
    """Owns an :class:`Engine` on a daemon thread (see the module docstring).

    ``on_step(seconds, requests, forwards)`` and ``on_image()`` feed the metrics."""

    def __init__(self, engine: Engine, *, total_steps=None, on_step=None, on_image=None):
        self.engine = engine
        self._total_steps = total_steps or (lambda request: request.num_steps)
        self._on_step, self._on_image = on_step, on_image
        self._inbox: list[tuple[str, Job]] = []
        self._wake = threading.Condition()
        self._jobs: list[Job] = []
        self._stop = False
        self.waiting = 0  # images submitted but not yet admitted into a step (for the queue gauge)
        self._thread = threading.Thread(target=self._loop, name="musefast-engine", daemon=True)
        self._thread.start()

    # -- called from any thread ------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._send("submit", job)

    def cancel(self, job: Job) -> None:
        self._send("cancel", job)

    def fail_all(self, error: BaseException) -> None:
        """Fail every job not finished (shutdown past its grace): each gets ``error``."""
        self._send("fail_all", error)

    @property
    def active(self) -> int:
        """Jobs submitted and not finished (the drain waits for 0)."""
        with self._wake:
            return len(self._jobs) + sum(1 for op, _ in self._inbox if op == "submit")

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)

    def _send(self, op: str, payload) -> None:
        with self._wake:
            self._inbox.append((op, payload))
            self._wake.notify()

    # -- the engine thread -----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._inbox or self._stop or self.engine.busy):
                    self._wake.wait()
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
            for op, payload in inbox:
                getattr(self, "_" + op)(payload)
            if self.engine.busy:
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - a forward that raised (OOM, a kernel error)
                    # fails the images it was advancing, with the error; the thread keeps serving
                    self._fail_all(exc)

    def _submit(self, job: Job) -> None:
        engine = self.engine
        if engine.queued + len(job.requests) > engine.max_queue:
            job.post(Event("rejected", error=QueueFull(
                f"the queue holds {engine.queued} of {engine.max_queue} images and this request adds "
                f"{len(job.requests)}: retry later")))
            return
        try:
            job.handles = [engine.submit(r) for r in job.requests]
        except Exception as exc:  # noqa: BLE001 - resolve() refusing a request answers its caller only
            for handle in job.handles:
                handle.cancel()
            job.post(Event("rejected", error=exc))
            return
        job._previews = [preview_steps(self._total_steps(h.request), job.partial_images) for h in job.handles]
        job._sent = [0] * len(job.handles)
        job._open = set(range(len(job.handles)))
        with self._wake:
            self._jobs.append(job)
        job.post(Event("accepted"))

    def _cancel(self, job: Job) -> None:
        for handle in job.handles:
            handle.cancel()
        self._retire(job)

    def _fail_all(self, error: BaseException) -> None:
        for job in list(self._jobs):
            for i in sorted(job._open):
                job.handles[i].cancel()
                job.post(Event("failed", index=i, error=error))
            job._open.clear()
            self._retire(job)

    def _retire(self, job: Job) -> None:
        with self._wake:
            if job in self._jobs:
                self._jobs.remove(job)

    def _step(self) -> None:
        start = time.perf_counter()
        forwards = self.engine.forwards
        ran = self.engine.step()
        if self._on_step is not None and ran:
            self._on_step(time.perf_counter() - start, ran, self.engine.forwards - forwards)
        self.waiting = self.engine.queued
        for job in list(self._jobs):
            self._report(job)

    @torch.no_grad()
    def _report(self, job: Job) -> None:
        for i in sorted(job._open):
            handle = job.handles[i]
            if handle.state is not State.QUEUED and job.started_at is None:
                job.started_at = time.perf_counter()
            try:
                if handle.state is State.DONE:
                    job.post(Event("image", index=i, image=_final_image(handle)))
                    if self._on_image is not None:
                        self._on_image()
                elif handle.state in (State.FAILED, State.CANCELLED):
                    job.post(Event("failed", index=i, error=handle.error or RuntimeError("cancelled")))
                elif job._sent[i] < len(job._previews[i]) and handle.steps_done >= job._previews[i][job._sent[i]]:
                    preview = handle.preview()
                    if preview is not None and bool(torch.isfinite(preview).all()):
                        job.post(Event("preview", index=i, image=preview.cpu(), partial=job._sent[i]))
                    job._sent[i] += 1
                    continue
                else:
                    continue
            except Exception as exc:  # noqa: BLE001 - a decode failure (NaN, OOM) fails this image only
                handle.cancel()
                job.post(Event("failed", index=i, error=exc))
            job._open.discard(i)
        if not job._open:
            self._retire(job)


def _final_image(handle):
    """The PIL image of a finished request; a decode that is not finite (NaN weights, fp16
    overflow) is this request's error, not a black image."""
    from musefast.pipelines.images import format_output

    tokens = handle.result()
    kind = "base" if handle.stage is None else handle.stage.kind
    pixels = handle.engine.adapter.decode(tokens[None], kind)
    if not bool(torch.isfinite(pixels).all()):
        raise FloatingPointError("the decoded image holds NaN or infinite values")
    return format_output(pixels, "pil")[0]
