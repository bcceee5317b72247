"""``musefast serve`` as a process: the ready line, SIGTERM drains (in-flight requests finish,
new ones get 503, exit code 0), a grace too short fails what is left with an error instead of
losing it, the request log, and the command's own errors."""
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from serving import start_process

httpx = pytest.importorskip("httpx")


def _generate(url, steps, results, name):
    results[name] = httpx.post(url + "/v1/images/generations", timeout=120,
                               json={"prompt": "a red circle on the left", "num_inference_steps": steps, "seed": 3})


def _in_flight(url):
    metrics = httpx.get(url + "/metrics").text
    return float(re.search(r"^musefast_in_flight_images (\S+)", metrics, re.M).group(1))


def _wait_in_flight(url):
    deadline = time.monotonic() + 30
    while _in_flight(url) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path):
    log = tmp_path / "requests.jsonl"
    process, url, lines = start_process("--grace", "60", "--log-requests", str(log))
    try:
        results = {}
        running = threading.Thread(target=_generate, args=(url, 1000, results, "running"))
        running.start()
        _wait_in_flight(url)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        refused = None
        while time.monotonic() < deadline:  # admission is off once the signal is handled
            refused = httpx.post(url + "/v1/images/generations", json={"prompt": "a blue square at the top"})
            if refused.status_code == 503:
                break
            time.sleep(0.05)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        running.join(120)
        assert results["running"].status_code == 200 and len(results["running"].json()["data"]) == 1
        assert process.wait(60) == 0, "".join(lines)
    finally:
        process.kill()
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    # the long request, and any probe that was admitted before the signal was handled
    ok = [e for e in entries if e["status"] == 200 and e["settings"][0]["num_steps"] == 1000]
    assert len(ok) == 1 and ok[0]["settings"][0]["seed"] == 3
    assert ok[0]["latency_s"] > 0 and ok[0]["outcome"] == "ok"
    assert any(e["status"] == 503 and e["outcome"] == "draining" for e in entries)


def test_a_grace_too_short_answers_the_leftovers_with_an_error(tmp_path):
    process, url, lines = start_process("--grace", "0.5")
    try:
        results = {}
        stuck = threading.Thread(target=_generate, args=(url, 1000, results, "stuck"))
        stuck.start()
        _wait_in_flight(url)
        process.send_signal(signal.SIGTERM)
        stuck.join(60)
        assert results["stuck"].status_code == 503, results["stuck"].text
        assert results["stuck"].json()["error"]["code"] == "shutdown"
        assert process.wait(60) == 0, "".join(lines)
    finally:
        process.kill()


def test_command_errors_are_one_line(tmp_path):
    from musefast.cli import main

    assert main(["serve", "--grace", "-1"]) == 2
    assert main(["serve", "--cors", "example.com"]) == 2
    done = subprocess.run([sys.executable, "-m", "musefast", "serve", "/no/such/folder", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "cannot load model" in done.stderr and "Traceback" not in done.stderr
