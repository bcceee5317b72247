"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Handlers raise :class:`APIError`; the app turns it (and any other failure, without its
traceback) into this JSON with the status OpenAI's clients expect, so the ``openai`` SDK
raises its matching exception (BadRequestError, AuthenticationError, RateLimitError, ...).
"""
from __future__ import annotations

# status -> OpenAI's error type for it
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable",
         504: "timeout_error"}


class APIError(Exception):
    """One failed request: ``status``, a one-line ``message``, the ``param`` (request field) it
    concerns, a machine-readable ``code`` and, for 429/503, a ``retry_after`` in seconds."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict:
        out = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.status == 401:
            out["WWW-Authenticate"] = "Bearer"
        return out


def invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    """A 400 for one field: ``message`` names the field and what it accepts."""
    return APIError(400, message, param=param, code=code)


def from_exception(exc: BaseException, param: str | None = None) -> APIError:
    """An image's failure as an APIError: a ValueError/TypeError is the request's fault (400,
    its one-line message); anything else is the server's (500, the exception's class and
    message, never a traceback)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, param=param,
                        code="invalid_value")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return APIError(500, f"generation failed: {type(exc).__name__}: {first}".rstrip(": "), code="generation_failed")
