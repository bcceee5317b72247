"""``Service``: the model, its engine thread and what one images request goes through —
admission, waiting (timeout, client gone), encoding, streaming, the request log.

Loading runs on a thread of its own so the server answers ``/health`` and 503 ("loading")
while a large model loads; ``ready`` turns true after the self-check: one small image made
through the engine, of the model's size and finite.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid

from musefast.generation import Engine, QueueFull, Request, State
from musefast.serve.config import ServerConfig
from musefast.serve.errors import APIError, from_exception
from musefast.serve.images import FileStore, b64, encode
from musefast.serve.metrics import Metrics
from musefast.serve.params import Output, request_error
from musefast.serve.worker import EngineWorker, Job

POLL_SECONDS = 0.2  # how often a waiting handler looks for its client being gone


class Service:
    def __init__(self, config: ServerConfig, pipe=None):
        self.config, self.pipe = config, pipe
        self.engine: Engine | None = None
        self.worker: EngineWorker | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.started = int(time.time())
        self.files = FileStore()
        self.metrics = Metrics(queue_depth=lambda: self.worker.waiting if self.worker else 0,
                               in_flight=lambda: self.engine.in_flight if self.engine else 0)
        self._latency = 1.0  # running mean of request latency (s), for Retry-After
        self._log_lock = threading.Lock()
        self._loader: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load, name="musefast-load", daemon=True)
        self._loader.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Whether loading finished (ready or failed) within ``timeout``."""
        self._loader.join(timeout)
        return not self._loader.is_alive()

    def _load(self) -> None:
        try:
            if self.pipe is None:
                import torch

                from musefast import load

                dtype = getattr(torch, self.config.dtype) if self.config.dtype else None
                self.pipe = load(self.config.model, device=self.config.device, dtype=dtype)
            self.engine = Engine(self.pipe, max_batch=self.config.max_batch, max_queue=self.config.max_queue,
                                 model_name=self.config.model_id)
            if self.config.self_check:
                self._self_check()
            self.worker = EngineWorker(self.engine, total_steps=self.total_steps, on_step=self.metrics.on_step,
                                       on_image=self.metrics.images.inc)
            self.ready = True
        except Exception as exc:  # noqa: BLE001 - reported by /ready and by the runner, in one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.load_error = f"cannot load model {self.config.model!r}: {type(exc).__name__}: {first}".rstrip(": ")

    def _self_check(self) -> None:
        """One 2-step image through the engine before the worker owns it."""
        handle = self.engine.submit(Request(prompt="a red circle on the left", seed=0, num_steps=2))
        image = handle.image()
        height, width = self.model_size()
        if image.size != (width, height):
            raise RuntimeError(f"self-check image is {image.size[0]}x{image.size[1]}, expected {width}x{height}")
        pixels = [v for band in image.getextrema() for v in band]
        if not pixels:
            raise RuntimeError("self-check image is empty")

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def model_size(self) -> tuple[int, int]:
        """(height, width) of a text-to-image result with the model's defaults."""
        resolved = self.engine.resolve(Request(prompt="x"))
        if resolved.size is not None:
            return tuple(resolved.size)
        n = getattr(self.pipe, "output_size", None) or getattr(self.pipe, "image_size")
        return n, n

    def total_steps(self, request: Request) -> int:
        """Steps of all stages of a resolved request (Muse's super-resolution stage adds its own)."""
        extra = 0
        if getattr(self.pipe, "super_res", None) is not None and request.init_image is None:
            extra = self.pipe.settings.super_res_steps
        return request.num_steps + extra

    def retry_after(self) -> int:
        return max(1, math.ceil(self._latency))

    def check_open(self) -> None:
        if self.draining:
            self.metrics.rejections.labels("draining").inc()
            raise APIError(503, "the server is shutting down and accepts no new requests", code="draining",
                           retry_after=self.retry_after())
        if not self.ready:
            self.metrics.rejections.labels("loading").inc()
            message = self.load_error or f"the model {self.config.model_id!r} is still loading"
            raise APIError(503, message, code="model_loading" if self.load_error is None else "model_failed",
                           retry_after=5 if self.load_error is None else None)

    # -- one images request ----------------------------------------------------------------

    async def submit(self, requests: list[Request], output: Output) -> Job:
        """Check ``requests`` against the model and queue them; -> the accepted job."""
        self.check_open()
        try:
            requests = [self.engine.resolve(r) for r in requests]
        except (ValueError, TypeError) as exc:
            self.metrics.rejections.labels("invalid").inc()
            raise request_error(exc) from None
        job = Job(requests, asyncio.get_running_loop(), partial_images=output.partial_images if output.stream else 0)
        self.worker.submit(job)
        event = await job.events.get()
        if event.kind == "rejected":
            if isinstance(event.error, QueueFull):
                self.metrics.rejections.labels("queue_full").inc()
                raise APIError(429, str(event.error), code="queue_full", retry_after=self.retry_after())
            self.metrics.rejections.labels("invalid").inc()
            raise from_exception(event.error)
        return job

    async def next_event(self, job: Job, deadline: float, is_disconnected):
        """The job's next event; raises APIError 504 past ``deadline`` and ConnectionAbortedError
        when the client is gone (the job is cancelled either way by the caller)."""
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                self.metrics.rejections.labels("timeout").inc()
                raise APIError(504, f"the request took longer than the server's timeout of "
                                    f"{self.config.request_timeout:g} s", code="timeout")
            try:
                return await asyncio.wait_for(job.events.get(), timeout=min(POLL_SECONDS, remaining))
            except asyncio.TimeoutError:
                if await is_disconnected():
                    raise ConnectionAbortedError("client disconnected") from None

    async def collect(self, job: Job, output: Output, deadline: float, is_disconnected, base_url: str) -> list[dict]:
        """Wait for every image of ``job``; -> the response's ``data`` entries."""
        images: dict[int, object] = {}
        while len(images) < len(job.requests):
            event = await self.next_event(job, deadline, is_disconnected)
            if event.kind == "image":
                images[event.index] = event.image
            elif event.kind == "failed":
                self.worker.cancel(job)
                raise self.failure(event.error)
        data = []
        for i in range(len(job.requests)):
            data.append(await asyncio.to_thread(self.encode_entry, job, i, images[i], output, base_url))
        return data

    def failure(self, error) -> APIError:
        failure = from_exception(error, param="image" if isinstance(error, (ValueError, TypeError)) else None)
        self.metrics.rejections.labels("failed" if failure.status >= 500 else "invalid").inc()
        return failure

    def encode_entry(self, job: Job, index: int, image, output: Output, base_url: str = "") -> dict:
        request = job.requests[index]
        data = encode(image, output.output_format, output.output_compression, self.png_params(request, image))
        entry = {"seed": request.seed}
        if output.response_format == "url":
            entry["url"] = f"{base_url.rstrip('/')}/v1/files/{self.files.put(data, output.output_format)}"
        else:
            entry["b64_json"] = b64(data)
        return entry

    def png_params(self, request: Request, image) -> dict | None:
        """What a served PNG carries: what ``musefast generate`` writes for the same image (the
        same bytes), which ``musefast generate --from-png`` reads back."""
        if request.init_image is not None:
            return None  # an edit's source image is not in the PNG: --from-png cannot redo it
        from musefast.image_metadata import generation_params

        return generation_params(request, image, sampler=self.engine.adapter.sampler_label())

    def usage(self, job: Job) -> dict:
        """OpenAI's usage counters in this model's units: prompt characters in, image tokens
        (of the finished images' last stage) out."""
        text = sum(len(r.prompt or "") for r in job.requests)
        images = sum(h.result().numel() for h in job.handles if h.state is State.DONE)
        return {"input_tokens": text, "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
                "output_tokens": images, "total_tokens": text + images}

    def finished(self, endpoint: str, started: float, status: int, job: Job | None, output: Output | None,
                 error: APIError | None = None, request_id: str | None = None) -> None:
        """Metrics and the request log line of one answered request."""
        latency = time.perf_counter() - started
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if status == 200:
            self.metrics.latency.labels(endpoint).observe(latency)
            self._latency = 0.8 * self._latency + 0.2 * latency
        if self.config.log_requests is None:
            return
        line = {"id": request_id or uuid.uuid4().hex, "endpoint": endpoint, "time": time.time(),
                "status": status, "latency_s": round(latency, 4),
                "outcome": "ok" if error is None else error.code or "error"}
        if error is not None:
            line["error"] = error.message
        if job is not None:
            line["queued_s"] = round((job.started_at or time.perf_counter()) - job.submitted_at, 4)
            line["images"] = len(job.requests)
            line["settings"] = [r.to_metadata() for r in job.requests]
        if output is not None:
            line.update(stream=output.stream, response_format=output.response_format,
                        output_format=output.output_format, user=output.user)
        text = json.dumps(line) + "\n"
        with self._log_lock, open(self.config.log_requests, "a", encoding="utf-8") as f:
            f.write(text)

