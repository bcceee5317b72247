"""``ServerConfig``: every setting of ``musefast serve``, checked once when it is built.

The same object configures the app (``create_app``), the uvicorn runner and the Ray Serve
deployment, so a value is validated in one place whatever starts the server. Each bad value
is a ValueError/TypeError of one line naming the setting and what it accepts.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

API_KEY_ENV = "MUSEFAST_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (each beyond it is refused: 413 for the body, else 400).

    max_side bounds each side of an uploaded edit image (a model checks its own output size:
    a request's ``size`` must be one the model makes)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_prompt_chars: int = 4000
    max_n: int = 10
    max_side: int = 4096

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompt_chars", "max_n", "max_side"):
            _positive_int(name, getattr(self, name))
        if self.max_n > 10:
            raise ValueError(f"max_n must be in [1, 10] (OpenAI's images API allows n up to 10), got {self.max_n}")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one server.

    Args:
        model: what ``musefast.load`` loads: ``"demo"``, a local folder or a hub id.
        host, port: where to listen (127.0.0.1 by default; port 0 picks a free port).
        max_batch: requests (images) decoded together in one step; max_queue: images waiting
            beyond them (a request that does not fit is answered 429 with Retry-After).
        api_key: the Bearer key every ``/v1`` route asks for (None: the ``MUSEFAST_API_KEY``
            environment variable, else no key).
        cors: origins allowed by CORS ([]: CORS off).
        grace: seconds SIGTERM/SIGINT waits for in-flight requests before failing them.
        request_timeout: seconds a request may take from arrival to its last image.
        log_requests: a JSONL file with one line per request (None: no log).
        limits: :class:`Limits`.
        device, dtype: where and in what precision the model runs (None: musefast.load's default).
        threads: torch CPU threads (None: 1 for the demo model on CPU, else torch's default).
        self_check: generate one small image after loading before ``/ready`` says yes.
    """

    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    cors: tuple = ()
    grace: float = 30.0
    request_timeout: float = 300.0
    log_requests: str | None = None
    limits: Limits = field(default_factory=Limits)
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    self_check: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalise once
        _string("model", self.model)
        _string("host", self.host)
        if isinstance(self.port, bool) or not isinstance(self.port, numbers.Integral) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535] (0: any free port), got {self.port!r}")
        _positive_int("max_batch", self.max_batch)
        _positive_int("max_queue", self.max_queue)
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV) or None
        if key is not None:
            _string("api_key", key)
            if any(c.isspace() for c in key):
                raise ValueError("api_key must not contain whitespace (it is sent as 'Authorization: Bearer KEY')")
        set_("api_key", key)
        cors = (self.cors,) if isinstance(self.cors, str) else self.cors
        if not isinstance(cors, (list, tuple)) or not all(isinstance(o, str) and o for o in cors):
            raise TypeError(f"cors must be a list of origins such as 'http://localhost:3000', got {self.cors!r}")
        for origin in cors:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"cors origin {origin!r} must be '*' or start with http:// or https://")
        set_("cors", tuple(cors))
        _positive_number("grace", self.grace, allow_zero=True)
        _positive_number("request_timeout", self.request_timeout)
        if self.log_requests is not None:
            set_("log_requests", os.fspath(self.log_requests))
        if not isinstance(self.limits, Limits):
            raise TypeError(f"limits must be a musefast.serve.config.Limits, got {type(self.limits).__name__}")
        if self.threads is not None:
            _positive_int("threads", self.threads)
        for name in ("device", "dtype"):
            if getattr(self, name) is not None:
                _string(name, getattr(self, name))

    @property
    def model_id(self) -> str:
        """The name ``/v1/models`` lists and requests give as ``model``: the model's name, never
        a server path (a local folder is named by its last component)."""
        text = self.model.rstrip("/\\")
        if os.path.isdir(text):
            return os.path.basename(text) or text
        return text

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


def _string(name: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _positive_number(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
