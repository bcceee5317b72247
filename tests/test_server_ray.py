"""``musefast serve --ray`` on a local Ray (num_cpus=2) with 2 replicas: the same API, and the
same image bytes as the single-process server for the same request, through the Ray Serve
proxy; SIGTERM lets an image in progress finish, then stops cleanly (exit 0, the application
gone from the cluster).

The test starts the local Ray itself and hands its address to ``musefast serve --ray-address``,
so it can see the replicas. Runs in CI's Ray stage (the ``distributed`` extra); skipped without
Ray Serve. Bounded: 37-42 s measured on the loaded 2-core development machine; a start that
takes over 4 minutes fails.
"""
from __future__ import annotations

import base64
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[distributed]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[distributed]')")
pytest.importorskip("fastapi", reason="the server needs FastAPI and uvicorn")
pytest.importorskip("uvicorn", reason="the server needs FastAPI and uvicorn")

from serving import LiveServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from screenshot_server_page import running_server  # noqa: E402

import musefast  # noqa: E402

REQUEST = {"prompt": "a red circle on the left of a blue square", "seed": 11, "n": 2, "num_inference_steps": 8}
START_TIMEOUT = 240  # local Ray, its Serve controller and proxy, two replicas each loading the model


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _post(url: str, body: dict) -> list[bytes]:
    request = urllib.request.Request(url + "/v1/images/generations", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return [base64.b64decode(item["b64_json"]) for item in json.load(response)["data"]]


def _streamed_final(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url + "/v1/images/generations", method="POST",
                                     data=json.dumps({**body, "n": 1, "stream": True, "partial_images": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        events = response.read().decode().split("\n\n")
    data = [json.loads(line[len("data: "):]) for event in events for line in event.splitlines()
            if line.startswith("data: ")]
    assert [d["type"] for d in data].count("image_generation.partial_image") == 2, [d["type"] for d in data]
    (final,) = [d for d in data if d["type"] == "image_generation.completed"]
    return base64.b64decode(final["b64_json"])


def _replicas_running() -> int:
    status = serve.status().applications["musefast"]
    return status.deployments["musefast"].replica_states.get("RUNNING", 0)


def test_two_replicas_give_the_single_process_servers_images(local_ray):
    with LiveServer(musefast.load("demo")) as solo:
        expected = _post(solo.url, REQUEST)
        expected_stream = _streamed_final(solo.url, REQUEST)
    assert len(expected) == 2 and expected[0] != expected[1]

    with running_server("demo", "--ray", "--replicas", "2", "--ray-address", local_ray,
                        timeout=START_TIMEOUT) as server:
        assert _replicas_running() == 2
        with urllib.request.urlopen(server.url + "/v1/models", timeout=30) as response:
            assert [m["id"] for m in json.load(response)["data"]] == ["demo"]
        with urllib.request.urlopen(server.url + "/", timeout=30) as response:  # the page is served too
            assert b"<form" in response.read()
        # Four at once, so both replicas take some: every answer is the single-process image.
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: _post(server.url, REQUEST), range(4)))
        assert all(answer == expected for answer in answers)
        assert _streamed_final(server.url, REQUEST) == expected_stream

        # SIGTERM while an image is being made: it still arrives, then the process exits 0.
        long = {**REQUEST, "n": 1, "num_inference_steps": 1000, "stream": True, "partial_images": 3}
        request = urllib.request.Request(server.url + "/v1/images/generations", data=json.dumps(long).encode(),
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response, ThreadPoolExecutor(1) as pool:
            assert response.readline().startswith(b"event: image_generation.partial_image")  # step 250 of 1000
            stopped = pool.submit(server.stop)
            rest = response.read().decode()
            assert stopped.result() == 0, server.output()[-3000:]
        assert "event: image_generation.completed" in rest, rest[-500:]
        assert "musefast" not in serve.status().applications
    assert "ready at http://127.0.0.1" in server.output()


@pytest.mark.parametrize("replicas", [0, -1, 1.5, "2", True])
def test_bad_replicas_are_one_line(replicas):
    from musefast.serve import ServerConfig
    from musefast.serve.ray_serve import deploy

    with pytest.raises(ValueError, match="replicas must be a positive int"):
        deploy(ServerConfig(), replicas=replicas)


def test_config_must_be_a_server_config():
    from musefast.serve.ray_serve import deploy

    with pytest.raises(TypeError, match="config must be a musefast.serve.ServerConfig"):
        deploy({"model": "demo"}, replicas=1)
