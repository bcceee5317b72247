"""``musefast serve --ray``: the server's FastAPI app on Ray Serve, one engine per replica.

Each replica builds the app itself from the :class:`ServerConfig` (so each loads its own copy of
the model and runs its own engine thread): the routes, the page, the errors and the images are
the single-process server's. Ray Serve's proxy listens on ``config.host:config.port`` and
spreads requests over the replicas; within a replica, requests share steps as they do in one
process. Needs the ``distributed`` extra (``ray[serve]``).
"""
from __future__ import annotations

import asyncio
import numbers
import signal
import socket
import sys
import threading

try:
    import ray
    from ray import serve
except ImportError as exc:  # the CLI turns this into its one-line error
    raise ImportError(f"ray[serve] is not installed ({exc}): pip install 'musefast[distributed,serve]'") from None

from musefast.serve.config import ServerConfig
from musefast.serve.run import exposure_warning

APP_NAME = "musefast"
# A replica is healthy once its model has loaded and passed the self-check; a large model on a CPU
# takes minutes to load, far beyond Ray Serve's default 30 s health check.
LOAD_TIMEOUT_S = 900.0


def application(config: ServerConfig, *, replicas: int):
    """The Ray Serve application (bound, not yet running) serving ``config`` on ``replicas``
    replicas."""
    _check(config, replicas)

    def build_app():  # runs in each replica's process
        from musefast.serve.app import create_app

        return create_app(config)

    @serve.ingress(build_app)
    class MusefastReplica:
        async def check_health(self):
            # Ray Serve sends traffic to a replica once this passes: wait for the model, and
            # fail a replica whose model could not be loaded (Ray Serve then replaces it).
            service = self.app.state.service
            await asyncio.to_thread(service.wait_loaded, LOAD_TIMEOUT_S)
            if not service.ready:
                raise RuntimeError(service.load_error or f"model {config.model_id!r} did not load in "
                                                         f"{LOAD_TIMEOUT_S:g} s")

    gpu = config.device is not None and config.device.startswith("cuda")
    deployment = serve.deployment(
        MusefastReplica,
        name="musefast",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": config.threads or 1, "num_gpus": 1 if gpu else 0},
        # The app queues and answers 429 itself: let every request it can hold reach it.
        max_ongoing_requests=config.max_batch + config.max_queue,
        health_check_timeout_s=LOAD_TIMEOUT_S,
        graceful_shutdown_timeout_s=config.grace,
    )
    return deployment.bind()


def deploy(config: ServerConfig, *, replicas: int, address: str | None = None, out=sys.stderr) -> int:
    """Serve ``config`` on Ray Serve with ``replicas`` replicas until SIGTERM/SIGINT; -> 0.

    ``address``: an existing Ray cluster (``"auto"``, ``"ray://head:10001"``, a GCS address);
    None starts a local Ray on this machine. On the signal, a local Ray is shut down whole; on an
    existing cluster only this application is deleted (other Serve applications keep running).
    In-flight requests get up to ``config.grace`` seconds to finish either way."""
    _check(config, replicas)
    if config.port == 0:  # Ray Serve's proxy takes a fixed port: choose the free one here
        config = _with_port(config, _free_port(config.host))
    warning = exposure_warning(config)
    if warning:
        print(f"musefast serve: warning: {warning}", file=out)
    ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application(config, replicas=replicas), name=APP_NAME, route_prefix="/", blocking=False)
        host = f"[{config.host}]" if ":" in config.host else config.host
        print(f"musefast serve: ready at http://{host}:{config.port} (model {config.model_id}, Ray Serve, "
              f"{replicas} replica{'s' if replicas > 1 else ''})", file=out, flush=True)
        while not stop.wait(0.5):  # a timed wait: the signal handler runs between waits
            pass
        print("musefast serve: stopping Ray Serve (in-flight requests get up to "
              f"{config.grace:g} s)", file=out, flush=True)
    finally:
        try:
            serve.delete(APP_NAME)  # waits for the replicas' graceful shutdown
            if address is None:
                serve.shutdown()
        finally:
            ray.shutdown()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return 0


def _check(config: ServerConfig, replicas: int) -> None:
    if not isinstance(config, ServerConfig):
        raise TypeError(f"config must be a musefast.serve.ServerConfig, got {type(config).__name__}")
    if isinstance(replicas, bool) or not isinstance(replicas, numbers.Integral) or replicas < 1:
        raise ValueError(f"replicas must be a positive int, got {replicas!r}")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _with_port(config: ServerConfig, port: int) -> ServerConfig:
    import dataclasses

    return dataclasses.replace(config, port=port)
