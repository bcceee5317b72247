"""Raw HTTP against ``musefast serve``: every refusal in OpenAI's error shape with its status
(400 naming the field, 401, 404, 413, 429 + Retry-After, 503), no traceback, and a failing
request leaving the others untouched."""
import io
import threading

import pytest
from PIL import Image

import musefast
from serving import LiveServer

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def pipe():
    return musefast.load("demo")


@pytest.fixture(scope="module")
def server(pipe):
    from musefast.serve import Limits

    with LiveServer(pipe, max_batch=1, max_queue=1, limits=Limits(max_body_bytes=64 * 1024, max_prompt_chars=200),
                    log_requests=None) as live:
        yield live


def _post(server, body=None, path="/v1/images/generations", **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw) if body is not None else \
        httpx.post(server.url + path, timeout=60, **kw)


def _error(response, status, param="-"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "\n" not in error["message"]
    if param != "-":
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": ""}, "prompt", "non-empty"),
    ({}, "prompt", "prompt"),
    ({"prompt": "a red circle on the left", "n": 11}, "n", "[1, 10]"),
    ({"prompt": "a red circle on the left", "n": "two"}, "n", "integer"),
    ({"prompt": "a red circle on the left", "size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a red circle on the left", "size": "128x128"}, "size", "(64, 64)"),
    ({"prompt": "a red circle on the left", "response_format": "file"}, "response_format", "b64_json, url"),
    ({"prompt": "a red circle on the left", "output_format": "gif"}, "output_format", "png, jpeg, webp"),
    ({"prompt": "a red circle on the left", "partial_images": 4}, "partial_images", "[0, 3]"),
    ({"prompt": "a red circle on the left", "num_inference_steps": 0}, "num_inference_steps", "[1, 1000]"),
    ({"prompt": "a red circle on the left", "guidance_scale": "high"}, "guidance_scale", "number"),
    ({"prompt": "a red circle on the left", "cache": "slow"}, "cache", "fast"),
    ({"prompt": "a red circle on the left", "seed": -1}, "seed", "integer"),
    ({"prompt": "a red circle on the left", "image": "/etc/passwd"}, "image", "unknown field"),
    ({"prompt": "x" * 201}, "prompt", "at most 200"),
    ({"prompt": "a red circle on the left", "background": "transparent"}, "background", "opaque"),
])
def test_invalid_fields_are_400_naming_the_field(server, body, param, words):
    error = _error(_post(server, body), 400, param)
    assert error["type"] == "invalid_request_error" and words in error["message"], error


def test_not_json_unknown_model_and_routes(server):
    _error(_post(server, content=b"{not json", headers={"content-type": "application/json"}), 400)
    error = _error(_post(server, {"prompt": "a red circle on the left", "model": "dall-e-2"}), 404, "model")
    assert error["code"] == "model_not_found" and "demo" in error["message"]
    _error(httpx.get(server.url + "/v1/models/gpt-image-1"), 404)
    _error(httpx.get(server.url + "/v1/nothing"), 404)


def test_body_too_large_is_413(server):
    _error(_post(server, {"prompt": "a" * 70_000}), 413)
    chunks = (b"x" * 16_384 for _ in range(8))  # no Content-Length: counted as it streams in
    _error(httpx.post(server.url + "/v1/images/generations", content=chunks, timeout=60), 413)


def test_edit_errors_name_image_and_mask(server):
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    no_alpha = io.BytesIO()
    Image.new("L", (64, 64), 255).save(no_alpha, format="PNG")
    post = lambda files, data=None: httpx.post(server.url + "/v1/images/edits", files=files,  # noqa: E731
                                               data=data or {"prompt": "a blue square on the right"}, timeout=60)
    _error(post({"image": ("a.png", b"not an image", "image/png")}), 400, "image")
    _error(post({"image": ("a.png", png.getvalue(), "image/png"), "mask": ("m.png", no_alpha.getvalue())}), 400, "mask")
    small = io.BytesIO()
    Image.new("RGBA", (32, 32)).save(small, format="PNG")
    _error(post({"image": ("a.png", png.getvalue(), "image/png"), "mask": ("m.png", small.getvalue())}), 400, "mask")
    _error(httpx.post(server.url + "/v1/images/edits", json={"prompt": "x"}), 400)


def test_full_queue_is_429_with_retry_after_and_the_others_finish(server):
    """max_batch 1, max_queue 1: a long request runs, a second waits, a third is refused."""
    results = {}

    def call(name, steps):
        results[name] = _post(server, {"prompt": "a red circle on the left", "seed": 1, "num_inference_steps": steps})

    long = threading.Thread(target=call, args=("long", 600))
    long.start()
    _wait(lambda: server.service.engine.in_flight == 1)
    waiting = threading.Thread(target=call, args=("waiting", 2))
    waiting.start()
    _wait(lambda: server.service.engine.queued == 1)
    refused = _post(server, {"prompt": "a blue square at the top", "num_inference_steps": 2})
    error = _error(refused, 429)
    assert error["code"] == "queue_full" and int(refused.headers["Retry-After"]) >= 1
    long.join(120)
    waiting.join(120)
    assert results["long"].status_code == 200 and results["waiting"].status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'musefast_rejections_total{reason="queue_full"} 1.0' in metrics


def test_a_failing_request_touches_no_other(server):
    """An edit whose image has the wrong size fails when it starts; the request beside it is served."""
    png = io.BytesIO()
    Image.new("RGB", (48, 48)).save(png, format="PNG")
    mask = io.BytesIO()
    Image.new("RGBA", (48, 48)).save(mask, format="PNG")
    results = {}
    good = threading.Thread(target=lambda: results.setdefault("good", _post(
        server, {"prompt": "a red circle on the left", "num_inference_steps": 40})))
    good.start()
    _wait(lambda: server.service.engine.in_flight == 1)  # max_queue 1: the bad edit takes the one queue slot
    bad = httpx.post(server.url + "/v1/images/edits", timeout=60, data={"prompt": "a blue square at the top"},
                     files={"image": ("a.png", png.getvalue(), "image/png"), "mask": ("m.png", mask.getvalue())})
    good.join(60)
    error = _error(bad, 400, "image")
    assert "64" in error["message"], error
    assert results["good"].status_code == 200 and len(results["good"].json()["data"]) == 1


def test_loading_failure_and_draining_are_503(pipe):
    from musefast.serve import create_app
    from musefast.serve.config import ServerConfig

    with LiveServer(None, model="/no/such/model/folder") as broken:
        error = _error(_post(broken, {"prompt": "a red circle on the left"}), 503)
        assert error["code"] == "model_failed" and "/no/such/model/folder" in error["message"]
        assert httpx.get(broken.url + "/ready").status_code == 503
        assert httpx.get(broken.url + "/health").status_code == 200
    with LiveServer(pipe) as live:
        live.service.draining = True
        refused = _post(live, {"prompt": "a red circle on the left"})
        assert _error(refused, 503)["code"] == "draining" and "Retry-After" in refused.headers
        assert httpx.get(live.url + "/ready").json()["status"] == "draining"
    with pytest.raises(TypeError, match="ServerConfig"):
        create_app({"model": "demo"})
    assert ServerConfig().api_key is None


def _wait(condition, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_forward_that_raises_fails_its_images_with_500_and_the_server_goes_on(server, monkeypatch):
    adapter = server.service.engine.adapter
    original = adapter.run
    calls = {"n": 0}

    def broken_once(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return original(*args, **kw)

    monkeypatch.setattr(adapter, "run", broken_once)
    error = _error(_post(server, {"prompt": "a red circle on the left", "num_inference_steps": 2}), 500)
    assert error["type"] == "server_error" and "simulated kernel failure" in error["message"]
    assert _post(server, {"prompt": "a red circle on the left", "num_inference_steps": 2}).status_code == 200


def test_timeout_is_504_and_frees_the_rows(pipe):
    with LiveServer(pipe, request_timeout=0.5) as live:
        error = _error(_post(live, {"prompt": "a red circle on the left", "num_inference_steps": 1000}), 504)
        assert error["code"] == "timeout"
        assert live.wait_idle(10)


def test_cors_is_off_unless_an_origin_is_given(pipe, server):
    preflight = dict(headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in httpx.options(server.url + "/v1/images/generations",
                                                              **preflight).headers
    with LiveServer(pipe, cors=["http://example.com"], self_check=False) as live:
        answer = httpx.options(live.url + "/v1/images/generations", **preflight)
        assert answer.headers["access-control-allow-origin"] == "http://example.com"


def test_binding_beyond_loopback_without_a_key_warns():
    from musefast.serve.config import ServerConfig
    from musefast.serve.run import exposure_warning

    assert exposure_warning(ServerConfig()) is None
    assert exposure_warning(ServerConfig(host="0.0.0.0", api_key="k")) is None
    assert "without an API key" in exposure_warning(ServerConfig(host="0.0.0.0"))
