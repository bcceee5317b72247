"""Drive musefast's web page in headless Chromium and save a screenshot of it.

Starts ``musefast serve`` (the demo model by default) on a free loopback port, opens the page
in the system's Chromium through Playwright, generates a few images and writes
docs/img/server-page.png:

    python scripts/screenshot_server_page.py [--out docs/img/server-page.png] [--chromium PATH]

Needs Debian's ``chromium`` (``apt-get install chromium``) and ``pip install playwright``; no
``playwright install``: the browser is the system's. tests/test_server_browser.py drives the page,
and tests/test_server_ray.py starts its server, through the functions below.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# Records every image the preview shows, in order, from before the click: previews can follow
# each other faster than a poll from Python would see them.
_WATCH_PREVIEW = """() => {
  window.__previewSources = [];
  const img = document.getElementById("preview");
  new MutationObserver(() => window.__previewSources.push(img.src))
    .observe(img, { attributes: true, attributeFilter: ["src"] });
}"""

# Settled: a new gallery entry whose image has decoded, or an error on display.
_SETTLED = """(before) => {
  const error = document.getElementById("error");
  if (!error.hidden) return true;
  const imgs = document.querySelectorAll("#gallery li img");
  return imgs.length > before && imgs[0].complete && imgs[0].naturalWidth > 0;
}"""

_RESULT = """async () => {
  const error = document.getElementById("error");
  const item = document.querySelector("#gallery li");
  const out = { error: error.hidden ? null : error.textContent, previews: window.__previewSources,
                updates: Number(document.getElementById("preview").dataset.updates || 0) };
  if (!item || out.error) return out;
  const img = item.querySelector("img"), link = item.querySelector("a[download]");
  const bytes = new Uint8Array(await (await fetch(link.href)).arrayBuffer());
  out.width = img.naturalWidth;
  out.height = img.naturalHeight;
  out.filename = link.getAttribute("download");
  out.download = btoa(String.fromCharCode(...bytes));
  out.settings = Object.fromEntries([...item.querySelectorAll("dt")].map((dt) => [dt.textContent, dt.nextElementSibling.textContent]));
  return out;
}"""


def find_chromium(explicit: str | None = None) -> str | None:
    """The system Chromium: ``explicit``, else $MUSEFAST_CHROMIUM, else the first on PATH."""
    for name in (explicit, os.environ.get("MUSEFAST_CHROMIUM"), *CHROMIUM_NAMES):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float, alive=lambda: True, announced=lambda: True) -> None:
    """Poll ``url``/ready until it answers 200 and ``announced()`` is true; TimeoutError after
    ``timeout`` seconds, RuntimeError as soon as ``alive()`` is false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited before it was ready")
        try:
            if announced():
                with urllib.request.urlopen(url + "/ready", timeout=5) as response:
                    if response.status == 200:
                        return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} was not ready within {timeout:g} s")


class ServerProcess:
    """A ``musefast serve`` child process: ``url``, ``stop() -> exit code`` (SIGTERM, the
    server's drain), ``output()`` (what it printed so far)."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "musefast", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self._log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, text=True, env=env)

    def output(self) -> str:
        if self._log.closed:
            return self._final_output
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._final_output = self.output()
            self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(*serve_args: str, timeout: float = 300.0, env: dict | None = None):
    """``musefast serve *serve_args`` on a free loopback port; yields its :class:`ServerProcess`
    once it printed its ready line and ``/ready`` answers 200 (its output is shown if it fails to
    start); stopped on exit."""
    server = ServerProcess(list(serve_args), env)
    try:
        try:
            # The ready line comes once every replica is up (Ray Serve answers /ready from the first).
            wait_ready(server.url, timeout, alive=lambda: server.proc.poll() is None,
                       announced=lambda: "ready at http" in server.output())
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{' '.join(server.args[1:])}: {exc}; its output:\n{server.output()[-4000:]}") from None
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def chromium_page(executable: str, width: int = 1200, height: int = 900):
    """A Playwright page in headless ``executable`` (the system browser, not Playwright's)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def generate_on_page(page, prompt: str, *, steps: int | None = None, seed: int | None = None,
                     negative_prompt: str = "", guidance: float | None = None, previews: int = 3,
                     timeout_s: float = 180.0) -> dict:
    """Fill the form, press Generate and wait for the result or an error. Returns
    ``{"error", "previews" (every src the preview showed), "updates", "width", "height",
    "filename", "download" (base64 of the download link's bytes), "settings"}``."""
    page.fill("#prompt", prompt)
    page.fill("#negative-prompt", negative_prompt)
    page.fill("#steps", "" if steps is None else str(steps))
    page.fill("#guidance", "" if guidance is None else str(guidance))
    if seed is not None:
        page.fill("#seed", str(seed))
    page.select_option("#partial-images", str(previews))
    page.evaluate(_WATCH_PREVIEW)
    before = page.locator("#gallery li").count()
    page.click("#generate")
    page.wait_for_function(_SETTLED, arg=before, timeout=timeout_s * 1000)
    return page.evaluate(_RESULT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "server-page.png"))
    parser.add_argument("--chromium", help="the Chromium executable (default: found on PATH)")
    parser.add_argument("--model", default="demo")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        parser.error("no Chromium found: apt-get install chromium, or pass --chromium PATH")
    shots = [("a red circle on the left", 3), ("a blue square at the top", 11), ("a yellow triangle on the right", 7)]
    with running_server(args.model) as server, chromium_page(chromium, 1200, 820) as page:
        page.goto(server.url + "/")
        for prompt, seed in shots:
            result = generate_on_page(page, prompt, steps=12, seed=seed)
            if result["error"]:
                raise SystemExit(f"the page showed an error: {result['error']}")
            print(json.dumps({"prompt": prompt, "previews": result["updates"],
                              "size": f"{result['width']}x{result['height']}"}))
        page.fill("#prompt", "a green circle at the bottom")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
