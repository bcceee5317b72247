"""The web page of ``musefast serve`` in a real browser: Debian's Chromium, headless, driven by
Playwright with the system browser (``scripts/ci_server_browser.sh`` installs both).

A real server (demo model, behind an API key) on 127.0.0.1: the page asks for the key, then a
typed prompt shows >= 2 previews from the SSE stream and a final image of the model's size,
whose download is the API's own image for the same settings; errors are shown in one line.
Skipped, with the reason, when Chromium or Playwright is missing. The page's files must also be
in the wheel (checked without a browser).
"""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from screenshot_server_page import chromium_page, find_chromium, generate_on_page, running_server  # noqa: E402

STATIC = ROOT / "musefast" / "serve" / "static"
KEY = "page-test-key"
PROMPT = "a red circle on the left"
STEPS = 8  # 3 previews fall after steps 2, 4 and 6


def _browser() -> str:
    pytest.importorskip("fastapi", reason="the server needs FastAPI and uvicorn")
    pytest.importorskip("uvicorn", reason="the server needs FastAPI and uvicorn")
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no system Chromium (apt-get install chromium, or set MUSEFAST_CHROMIUM)")
    return chromium


@pytest.fixture(scope="module")
def server():
    _browser()
    with running_server("demo", "--api-key", KEY) as process:
        yield process.url


@pytest.fixture
def page(server):
    with chromium_page(_browser()) as page:
        page.goto(server + "/")
        page.wait_for_selector("#api-key", state="visible", timeout=30_000)  # /v1/models answered 401
        page.fill("#api-key", KEY)
        page.press("#api-key", "Tab")  # leaving the field commits it (a change event), as a user does
        page.wait_for_function("document.getElementById('server-model').textContent.startsWith('Model')")
        yield page


def _image(b64: str):
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def _api_image(url: str, **body) -> bytes:
    request = urllib.request.Request(url + "/v1/images/generations", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return base64.b64decode(json.load(response)["data"][0]["b64_json"])


def test_generate_shows_previews_then_the_image_of_the_models_size(server, page):
    import musefast

    size = musefast.load("demo").output_size
    result = generate_on_page(page, PROMPT, steps=STEPS, seed=7, previews=3)
    assert result["error"] is None
    previews = [src.split(",", 1)[1] for src in result["previews"] if src.startswith("data:image/png;base64,")]
    assert len(previews) >= 2, result["previews"]
    assert len(set(previews)) >= 2, "the previews never changed"
    assert all(_image(p).size == (size, size) for p in previews)
    assert (result["width"], result["height"]) == (size, size)
    assert result["settings"]["Seed"] == "7" and result["settings"]["Steps"] == str(STEPS)
    assert result["filename"].endswith(".png")
    assert page.locator("#size option").first.text_content().startswith(f"{size}x{size}")
    # The download link holds exactly what the API gives for the same settings.
    assert base64.b64decode(result["download"]) == _api_image(server, prompt=PROMPT, seed=7,
                                                              num_inference_steps=STEPS)


def test_a_refused_request_is_one_line_on_the_page(page):
    # A size the model does not make: the server's 400 message is shown, the gallery unchanged.
    page.evaluate("""() => { const s = document.getElementById('size');
                             s.add(new Option('13x13', '13x13')); s.disabled = false; s.value = '13x13'; }""")
    result = generate_on_page(page, PROMPT, steps=STEPS)
    assert result["error"] and "size" in result["error"], result
    assert "\n" not in result["error"].strip() and "Traceback" not in result["error"]
    assert page.locator("#gallery li").count() == 0
    assert page.is_enabled("#generate")


def test_the_key_field_shows_only_when_the_server_asks_for_one(server):
    # The same page against a server that answers /v1/models without a key (stood in for by
    # Playwright answering that one route).
    models = {"object": "list", "data": [{"id": "demo", "object": "model", "owned_by": "musefast"}]}
    with chromium_page(_browser()) as page:
        page.route("**/v1/models", lambda route: route.fulfill(status=200, content_type="application/json",
                                                               body=json.dumps(models)))
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('server-model').textContent.startsWith('Model')")
        assert not page.is_visible("#api-key")
        assert page.is_visible("#prompt") and page.is_visible("#generate")


def test_a_wrong_key_is_reported(page):
    page.fill("#api-key", "not-the-key")
    result = generate_on_page(page, PROMPT, steps=STEPS)
    assert result["error"] and "API key" in result["error"], result


def test_stop_ends_the_generation(page):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "1000")  # the server's most: the first preview comes at step 250, 750 are left
    page.click("#generate")
    page.wait_for_function("Number(document.getElementById('preview').dataset.updates) >= 1"
                           " || !document.getElementById('error').hidden", timeout=120_000)
    assert not page.is_visible("#error"), page.text_content("#error")
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'Stopped.'", timeout=30_000)
    assert page.locator("#gallery li").count() == 0
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")
    assert not page.is_visible("#error")


def test_the_page_works_offline():
    """Nothing the page loads comes from another host (no CDN): every src/href is relative."""
    text = "\n".join(p.read_text() for p in STATIC.iterdir())
    assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_the_page_is_in_the_wheel(tmp_path):
    src = tmp_path / "src"  # a copy: a build writes build/ and *.egg-info next to setup.py
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.so", "assets")
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("musefast", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                           str(src)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No matching distribution found for setuptools" in proc.stderr:
        pytest.skip("no package index reachable for the isolated build's setuptools")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("musefast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    page_files = {f"musefast/serve/static/{p.name}" for p in STATIC.iterdir()}
    assert {"musefast/serve/static/index.html", "musefast/serve/static/app.js"} <= page_files
    assert sorted(page_files - names) == []
