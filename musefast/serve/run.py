"""Running the app with uvicorn: the ready line, the non-loopback warning, and the drain.

uvicorn on its own stops listening at the first SIGTERM, so late clients would see a refused
connection. Here the first SIGTERM/SIGINT only turns admission off (new requests get 503,
``/ready`` says "draining"), waits up to ``grace`` seconds for in-flight requests, fails
whatever is left with a 503 error (nothing accepted ends without an answer), and then lets
uvicorn shut down; a second signal stops at once.
"""
from __future__ import annotations

import asyncio
import sys
import time

import uvicorn

from musefast.serve.config import ServerConfig
from musefast.serve.errors import APIError

ANSWER_SECONDS = 5.0  # after failing the leftovers: time for their handlers to send the 503s


class ServeError(RuntimeError):
    """The server could not start (model not loadable): one line, exit code 1."""


def serve(config: ServerConfig, *, pipe=None, out=sys.stderr) -> int:
    """Serve until SIGTERM/SIGINT; -> 0 after a clean drain."""
    from musefast.serve.app import create_app

    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    app = create_app(config, pipe=pipe)
    warning = exposure_warning(config)
    if warning:
        print(f"musefast serve: warning: {warning}", file=out)
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           access_log=False, lifespan="on", timeout_graceful_shutdown=5),
                            app.state.service, out)
    server.run()
    if server.failure:
        raise ServeError(server.failure)
    return 0


def exposure_warning(config: ServerConfig) -> str | None:
    """What to warn about when the server is reachable from other machines without a key."""
    if config.loopback or config.api_key is not None:
        return None
    return (f"listening on {config.host} without an API key: anyone who can reach this port can use the model "
            "(set --api-key or MUSEFAST_API_KEY)")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with the ready line and the drain of the module docstring."""

    def __init__(self, config: uvicorn.Config, service, out=sys.stderr):
        super().__init__(config)
        self.service, self.out, self.failure = service, out, None
        self._signals = 0

    def handle_exit(self, sig, frame):
        self._signals += 1
        if self._signals > 1:  # a second signal: uvicorn's own stop (which re-raises the signal)
            super().handle_exit(sig, frame)
        elif not self.service.ready:  # nothing accepted yet: nothing to drain
            self.should_exit = True

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if not self.should_exit:
            asyncio.get_running_loop().create_task(self._announce_and_watch())

    async def _announce_and_watch(self):
        service = self.service
        while not (service.ready or service.load_error or self.should_exit):
            await asyncio.sleep(0.05)
        if service.load_error:
            self.failure, self.should_exit = service.load_error, True
            return
        if self.should_exit:
            return
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        port = self.servers[0].sockets[0].getsockname()[1]  # the real one when --port 0
        print(f"musefast serve: ready at http://{host}:{port} (model {service.config.model_id})",
              file=self.out, flush=True)
        while not self._signals and not self.should_exit:
            await asyncio.sleep(0.05)
        if not self.should_exit:
            await self._drain()

    async def _drain(self):
        service = self.service
        service.draining = True
        grace = service.config.grace
        print(f"musefast serve: draining ({service.worker.active} requests in flight, up to {grace:g} s)",
              file=self.out, flush=True)
        await self._wait(lambda: service.worker.active == 0 or self._signals > 1, grace)
        if service.worker.active:
            service.worker.fail_all(APIError(503, "the server shut down before this image was finished",
                                             code="shutdown"))
        # the handlers were told; let their answers leave before uvicorn closes the connections
        await self._wait(lambda: all(task.done() for task in self.server_state.tasks), ANSWER_SECONDS)
        self.should_exit = True

    @staticmethod
    async def _wait(condition, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
