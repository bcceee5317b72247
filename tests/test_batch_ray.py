"""`musefast batch --ray` on a local Ray (num_cpus=2): same tokens and bytes as in-process for
1 and 2 actors, and exactly-once when an actor is SIGKILLed mid-run."""
import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[distributed]')")

from musefast.batch import batch_generate  # noqa: E402

STEPS = 4
CAPTIONS = ["a red circle on the left", "a blue square at the top", "a green triangle on the right",
            "a yellow ring at the bottom", "a purple cross in the centre", "an orange diamond above a red ring"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@contextlib.contextmanager
def _threads(n: int):
    """The in-process reference runs with the actors' thread count (cpus_per_worker=1): a different
    torch thread count may order CPU reductions differently and flip a rare near-tie token."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prompts(n):
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]


def _lines(out: Path) -> dict:
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in lines}
    assert len(by_id) == len(lines), "an id has two manifest lines"
    for r in lines:
        assert hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() == r["sha256"]
    assert len(list((out / "images").glob("*.png"))) == len(lines)
    return by_id


def _same_results(a: dict, b: dict) -> bool:
    return {k: (r["tokens_sha256"], r["sha256"]) for k, r in a.items()} == \
           {k: (r["tokens_sha256"], r["sha256"]) for k, r in b.items()}


def test_one_and_two_actors_match_in_process(local_ray, tmp_path):
    prompts = _prompts(12)
    with _threads(1):
        batch_generate(prompts, tmp_path / "local", num_steps=STEPS, batch_size=4, progress=False)
    local = _lines(tmp_path / "local")
    for workers in (1, 2):
        out = tmp_path / f"ray{workers}"
        summary = batch_generate(prompts, out, num_steps=STEPS, batch_size=2, ray=True, workers=workers,
                                 cpus_per_worker=1, progress=False)
        assert summary["done"] == 12
        assert _same_results(_lines(out), local), f"{workers} actor(s)"


def _my_actor_pids() -> list[int]:
    """Ray Data's map actors started by this test's Ray (descendants of this process)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
            pid, ancestors = int(proc.name), set()
            p = pid
            while p > 1:
                p = int((Path("/proc") / str(p) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                ancestors.add(p)
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith("ray::MapWorker") and os.getpid() in ancestors:
            pids.append(pid)
    return pids


def test_an_actor_killed_mid_run_gives_every_row_once(local_ray, tmp_path):
    n = 24
    out = tmp_path / "out"
    result = {}

    def run():
        try:
            result["summary"] = batch_generate(_prompts(n), out, num_steps=STEPS, batch_size=2, ray=True,
                                               workers=2, cpus_per_worker=1, progress=False)
        except Exception as exc:  # Ray may give up on the batch: the re-run below must then finish the job
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and thread.is_alive() and killed is None:
        if manifest.exists() and len(manifest.read_bytes().splitlines()) >= 2:
            pids = _my_actor_pids()  # an idle pool of the previous test may linger: kill every one found
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed = pids or None
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "no actor was found to kill before the run ended"
    lines = _lines(out)
    if "summary" in result:  # Ray restarted the actor and retried its batch
        assert result["summary"]["done"] == n and len(lines) == n
    else:  # a re-run completes the job, still exactly once
        with _threads(1):
            batch_generate(_prompts(n), out, num_steps=STEPS, batch_size=2, progress=False)
        lines = _lines(out)
    assert len(lines) == n
    with _threads(1):
        batch_generate(_prompts(n), tmp_path / "local", num_steps=STEPS, batch_size=8, progress=False)
    assert _same_results(lines, _lines(tmp_path / "local"))
