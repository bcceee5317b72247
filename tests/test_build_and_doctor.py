"""The extension builds against the running torch; doctor and the CLI report it."""
import subprocess
import sys

import pytest
import torch

import musefast
from musefast import _build


def test_extension_built_and_registered():
    status = _build.extension_status()
    assert status["built"], status["error"]
    assert hasattr(torch.ops.musefast, "vq_nearest")
    assert status["cpu_isa"] in ("avx512", "avx2", "baseline")


def test_doctor_reports_build_and_backends():
    report = musefast.doctor()
    assert "musefast._C: built" in report
    assert "vq_nearest" in report and "cpu         ok" in report


def test_cli_doctor_runs():
    out = subprocess.run([sys.executable, "-m", "musefast.cli", "doctor"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "backends for cpu tensors" in out.stdout


def test_disabled_extension_still_works_and_says_why():
    code = (
        "import torch, musefast\n"
        "from musefast import ops\n"
        "print(ops.vq_nearest(torch.eye(3), torch.eye(3)).tolist())\n"
        "print(ops.backends('cpu')['vq_nearest']['cpu'])\n"
    )
    env = {"MUSEFAST_NO_EXT": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "[0, 1, 2]"
    assert "not built" in lines[1] and "MUSEFAST_NO_EXT" in lines[1]


def test_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build killed half-way leaves torch's ``lock`` file; an old one must not hang imports."""
    import os
    import time

    from musefast._build import STALE_LOCK_SECONDS, clear_stale_build_lock

    assert clear_stale_build_lock(tmp_path) is False  # no lock at all
    lock = tmp_path / "lock"
    lock.touch()
    assert clear_stale_build_lock(tmp_path) is False and lock.exists()  # a build may be running
    old = time.time() - STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale extension build lock"):
        assert clear_stale_build_lock(tmp_path) is True
    assert not lock.exists()
