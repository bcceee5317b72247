"""A real ``musefast serve`` app on 127.0.0.1 for the server tests: uvicorn on a free port in
a thread of the test process, serving an already-loaded pipeline (so the tests share one model
and compare with it directly)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("multipart")

import uvicorn  # noqa: E402

from musefast.serve import ServerConfig, create_app  # noqa: E402

PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
           "a yellow ring at the bottom", "a purple cross in the centre", "an orange diamond above a red ring"]


class LiveServer:
    """``with LiveServer(pipe, max_batch=4) as server: server.url``."""

    def __init__(self, pipe, **config):
        config.setdefault("port", 0)
        self.config = ServerConfig(**config)
        self.app = create_app(self.config, pipe=pipe)
        self.service = self.app.state.service
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=self.config.host, port=self.config.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and (self.service.ready or self.service.load_error)):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Whether the engine emptied (nothing queued or in flight) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.service.worker.active == 0 and not self.service.engine.busy:
                return True
            time.sleep(0.02)
        return False


def solo_image(pipe, prompt: str, seed: int, **kw):
    """The pipeline's own one-image run: what a served image must equal."""
    return pipe(prompt, seed=seed, progress=False, **kw)[0]


def start_process(*args, env=None):
    """``musefast serve --port 0 ARGS`` as a child process; -> (process, url, stderr lines so far
    and later) once it printed its ready line."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "musefast", "serve", "--port", "0", *args],
                               stderr=subprocess.PIPE, text=True, env=environment)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"ready at (http://\S+)", line)
        if match:
            threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
            return process, match.group(1), lines
    process.kill()
    raise AssertionError("no ready line: " + "".join(lines))
