"""``create_app``: the FastAPI app of ``musefast serve`` — OpenAI's images API on the engine.

Routes: ``POST /v1/images/generations``, ``POST /v1/images/edits``, ``GET /v1/models``,
``GET /v1/files/{name}`` (images of ``response_format="url"``), ``GET /health``,
``GET /ready``, ``GET /metrics``; the web page (``static/``) at ``/`` when it is installed.
Every error is OpenAI's JSON shape (``errors.py``); no response carries a traceback.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from musefast.pipelines.images import format_output
from musefast.serve.config import ServerConfig
from musefast.serve.errors import APIError
from musefast.serve.params import parse
from musefast.serve.service import Service
from musefast.serve.uploads import read_edit_form

STATIC = Path(__file__).resolve().parent / "static"


def create_app(config: ServerConfig, *, pipe=None) -> FastAPI:
    """The app serving ``config.model`` (``pipe``: an already-loaded pipeline to serve instead,
    as tests and Ray replicas pass). The model loads, and the engine thread starts, when the
    app starts (ASGI lifespan); until then the images routes answer 503."""
    if not isinstance(config, ServerConfig):
        raise TypeError(f"config must be a musefast.serve.ServerConfig, got {type(config).__name__}")
    service = Service(config, pipe)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="musefast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    _errors(app)
    if config.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=config.limits.max_body_bytes)
    _routes(app, service)
    if STATIC.is_dir():  # after the API routes: they take precedence over files of the page
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=STATIC, html=True), name="static")
    return app


def _errors(app: FastAPI) -> None:
    def answer(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers())

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return answer(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return answer(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))
        if exc.status_code == 405:
            return answer(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                   code="method_not_allowed"))
        return answer(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        # a failure of the server's own code is never blamed on the request: 500, one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        return answer(APIError(500, f"internal error: {type(exc).__name__}: {first}".rstrip(": "),
                               code="internal_error"))


def _authorize(service: Service, request: HTTPRequest) -> None:
    key = service.config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
        service.metrics.rejections.labels("unauthorized").inc()
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (the server's --api-key)",
                       code="invalid_api_key")


async def _json_body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _routes(app: FastAPI, service: Service) -> None:
    config = service.config

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if service.ready and not service.draining:
            return {"status": "ready", "model": config.model_id}
        status = "draining" if service.draining else ("failed" if service.load_error else "loading")
        return JSONResponse({"status": status, "model": config.model_id, "error": service.load_error},
                            status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.text(), media_type=service.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        _authorize(service, request)
        return {"object": "list", "data": [_model_entry(service)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest):
        _authorize(service, request)
        if model_id != config.model_id:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {config.model_id!r}",
                           param="model", code="model_not_found")
        return _model_entry(service)

    @app.get("/v1/files/{name}")
    async def files(name: str):
        # no key asked: the random name is the credential, as OpenAI's signed image URLs are
        found = service.files.get(name)
        if found is None:
            raise APIError(404, "no such image: images of response_format=url are kept for a bounded time",
                           code="file_not_found")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/v1/images/generations")
    async def generations(request: HTTPRequest):
        started = time.perf_counter()
        try:
            _authorize(service, request)
            service.check_open()
            body = await _json_body(request)
            requests, output = parse(body, model_id=config.model_id, limits=config.limits)
        except APIError as exc:
            service.finished("generations", started, exc.status, None, None, exc)
            raise
        return await _answer(service, request, "generations", requests, output, started)

    @app.post("/v1/images/edits")
    async def edits(request: HTTPRequest):
        started = time.perf_counter()
        try:
            _authorize(service, request)
            service.check_open()
            fields, image, mask = await read_edit_form(request, config.limits)
            requests, output = parse(fields, model_id=config.model_id, limits=config.limits, edit=True,
                                     init_image=image, mask=mask)
        except APIError as exc:
            service.finished("edits", started, exc.status, None, None, exc)
            raise
        return await _answer(service, request, "edits", requests, output, started)


def _model_entry(service: Service) -> dict:
    return {"id": service.config.model_id, "object": "model", "created": service.started, "owned_by": "musefast"}


async def _answer(service: Service, request: HTTPRequest, endpoint: str, requests, output, started: float):
    request_id = uuid.uuid4().hex
    try:
        job = await service.submit(requests, output)
    except APIError as exc:
        service.finished(endpoint, started, exc.status, None, output, exc, request_id)
        raise
    deadline = started + service.config.request_timeout
    if output.stream:
        return StreamingResponse(_events(service, request, endpoint, job, output, started, deadline, request_id),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
    try:
        data = await service.collect(job, output, deadline, request.is_disconnected, str(request.base_url))
    except ConnectionAbortedError:
        service.worker.cancel(job)
        service.finished(endpoint, started, 499, job, output, APIError(499, "client disconnected",
                                                                        code="client_disconnected"), request_id)
        return Response(status_code=499)
    except APIError as exc:
        service.worker.cancel(job)
        service.finished(endpoint, started, exc.status, job, output, exc, request_id)
        raise
    except BaseException:  # the handler cancelled (server stopping): the images leave the batch
        service.worker.cancel(job)
        raise
    service.finished(endpoint, started, 200, job, output, None, request_id)
    height, width = requests[0].size or service.model_size()
    body = {"created": int(time.time()), "data": data, "background": "opaque", "output_format": output.output_format,
            "quality": "auto", "size": f"{width}x{height}", "usage": service.usage(job)}
    return JSONResponse(body, headers={"X-Request-Id": request_id})


def _sse(event: str, payload: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


async def _events(service: Service, request: HTTPRequest, endpoint: str, job, output, started, deadline, request_id):
    """OpenAI's image streaming: ``<prefix>.partial_image`` events (the preview decoded from the
    current tokens), then one ``<prefix>.completed`` per image; a failure is an ``error``
    event in OpenAI's error shape (the status line was already sent)."""
    prefix = "image_generation" if endpoint == "generations" else "image_edit"
    height, width = job.requests[0].size or service.model_size()
    common = {"background": "opaque", "output_format": output.output_format, "quality": "auto",
              "size": f"{width}x{height}"}
    done, status, error = 0, 200, None
    try:
        while done < len(job.requests):
            event = await service.next_event(job, deadline, request.is_disconnected)
            if event.kind == "preview":
                image = format_output(event.image[None], "pil")[0]
                entry = await asyncio.to_thread(service.encode_entry, job, event.index, image, output)
                yield _sse(f"{prefix}.partial_image", {
                    "type": f"{prefix}.partial_image", "b64_json": entry["b64_json"], "created_at": int(time.time()),
                    "partial_image_index": event.partial, "image_index": event.index, **common})
            elif event.kind == "image":
                entry = await asyncio.to_thread(service.encode_entry, job, event.index, event.image, output)
                done += 1
                yield _sse(f"{prefix}.completed", {
                    "type": f"{prefix}.completed", "b64_json": entry["b64_json"], "created_at": int(time.time()),
                    "image_index": event.index, "seed": entry["seed"], "usage": service.usage(job), **common})
            elif event.kind == "failed":
                raise service.failure(event.error)
    except APIError as exc:
        status, error = exc.status, exc
        service.worker.cancel(job)
        yield _sse("error", exc.body())
    except ConnectionAbortedError:
        status, error = 499, APIError(499, "client disconnected", code="client_disconnected")
    finally:
        if done < len(job.requests):
            service.worker.cancel(job)
            if error is None:  # cancelled by the server (client gone, shutdown)
                status, error = 499, APIError(499, "client disconnected", code="client_disconnected")
        service.finished(endpoint, started, status, job, output, error, request_id)


class BodyLimit:
    """A pure ASGI middleware answering 413 when a body exceeds ``max_bytes``: by its
    Content-Length before anything is read, else while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body exceeds this server's limit of {self.max_bytes} bytes",
                             code="request_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            service = scope["app"].state.service if "app" in scope else None
            if service is not None:
                service.metrics.rejections.labels("too_large").inc()
            return await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except APIError as exc:
            if exc is not too_large or started:
                raise
            await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
