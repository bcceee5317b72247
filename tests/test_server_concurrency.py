"""Continuous batching under real clients: many concurrent requests at mixed steps each get
the image of their solo pipeline run, and a client that disconnects frees its rows."""
import base64
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import musefast
from serving import PROMPTS, LiveServer, solo_image

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def pipe():
    return musefast.load("demo")


def _case(i):
    return dict(prompt=PROMPTS[i % len(PROMPTS)], seed=100 + 3 * i, steps=[2, 5, 9, 3, 12][i % 5],
                guidance=[None, 1.0, 3.0][i % 3], n=1 + (i % 4 == 0))


def test_concurrent_clients_at_mixed_steps_get_their_solo_images(pipe):
    cases = [_case(i) for i in range(16)]
    with LiveServer(pipe, max_batch=6) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def call(case):
            extra = {"seed": case["seed"], "num_inference_steps": case["steps"]}
            if case["guidance"] is not None:
                extra["guidance_scale"] = case["guidance"]
            return client.images.generate(prompt=case["prompt"], n=case["n"], extra_body=extra)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(call, cases))
        metrics = httpx.get(server.url + "/metrics").text
    compared = 0
    for case, result in zip(cases, results):
        assert len(result.data) == case["n"]
        for i, entry in enumerate(result.data):
            kw = {"num_steps": case["steps"]}
            if case["guidance"] is not None:
                kw["guidance_scale"] = case["guidance"]
            served = np.asarray(Image.open(io.BytesIO(base64.b64decode(entry.b64_json))).convert("RGB"))
            assert np.array_equal(served, np.asarray(solo_image(pipe, case["prompt"], case["seed"] + i, **kw))), case
            compared += 1
    assert compared == 20
    # rows of several requests shared forwards: some step advanced more than one image
    rows = [line for line in metrics.splitlines() if line.startswith('musefast_rows_per_forward_bucket{le="1.0"}')]
    total = [line for line in metrics.splitlines() if line.startswith("musefast_rows_per_forward_count")]
    assert float(rows[0].split()[-1]) < float(total[0].split()[-1])
    assert "musefast_images_total 20.0" in metrics


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_frees_its_rows(pipe, stream):
    with LiveServer(pipe, max_batch=4) as server:
        body = {"prompt": "a red circle on the left", "n": 2, "num_inference_steps": 1000, "stream": stream}
        if stream:
            body["partial_images"] = 1
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:  # a client that leaves mid-generation
            payload = json.dumps(body).encode()
            raw.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
            deadline = time.monotonic() + 30
            while server.service.engine.in_flight < 2:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.01)
            forwards_before = server.service.engine.forwards
        # the connection is closed: the rows leave the batch at a step boundary, long before 1000 steps
        assert server.wait_idle(10), "the disconnected request's rows are still in the batch"
        assert server.service.engine.forwards - forwards_before < 500
        follow = httpx.post(server.url + "/v1/images/generations", timeout=60,
                            json={"prompt": "a blue square at the top", "num_inference_steps": 2})
        assert follow.status_code == 200
