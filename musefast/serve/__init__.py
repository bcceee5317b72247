"""``musefast serve``: OpenAI's images API over the generation engine (FastAPI + uvicorn).

``create_app(ServerConfig(...))`` builds the ASGI app; ``musefast.serve.run.serve(config)``
runs it with uvicorn, draining on SIGTERM/SIGINT. Needs the ``serve`` extra
(``pip install 'musefast[serve]'``).
"""
from musefast.serve.config import Limits, ServerConfig


def create_app(config: ServerConfig, *, pipe=None):
    """See :func:`musefast.serve.app.create_app` (imported on use: FastAPI is an extra)."""
    from musefast.serve.app import create_app as create

    return create(config, pipe=pipe)


__all__ = ["Limits", "ServerConfig", "create_app"]
