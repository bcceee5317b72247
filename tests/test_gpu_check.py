"""scripts/gpu_check.py: the report's shape, partial reports and step timeouts, on CPU.

The full rehearsal (``python scripts/gpu_check.py --rehearse --out DIR``, every step) runs in
CI on its own; here a fast subset checks what a lent GPU session relies on: one subprocess per
step, a report with every requested step and its figures, a timed-out step recorded as failed.
"""
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check  # noqa: E402


def _check_shape(report: dict, steps: list[str]) -> None:
    assert report["kind"] == "rehearsal" and report["complete"] is True
    assert set(report) >= {"started", "budget_s", "environment", "steps", "wall_s", "passed"}
    assert list(report["steps"]) == steps
    for step in report["steps"].values():
        assert set(step) >= {"status", "wall_s", "figures", "error"}
        assert step["status"] in ("pass", "fail", "skipped") and step["wall_s"] >= 0


def test_every_step_has_an_implementation():
    import gpu_check_steps

    assert gpu_check.STEP_NAMES == list(gpu_check_steps.STEPS)


def test_rehearsal_subset_writes_the_report(tmp_path):
    code = gpu_check.main(["--rehearse", "--out", str(tmp_path), "--only", "env,selftest"])
    report = json.loads((tmp_path / gpu_check.REPORT_NAME).read_text())
    _check_shape(report, ["env", "selftest"])
    assert code == 0 and report["passed"]
    env = report["environment"]
    assert env["torch"] and env["cuda_available"] is False and env["python"].count(".") == 2
    assert report["steps"]["selftest"]["status"] in ("pass", "skipped")
    assert "===== env: pass" in (tmp_path / gpu_check.LOG_NAME).read_text()


def test_a_step_past_its_timeout_fails_and_the_rest_still_report(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "STEPS", [("env", 60, 0.5), ("selftest", 60, 60)])
    report = gpu_check.run(tmp_path, rehearse=True, budget_s=6)
    _check_shape(report, ["env", "selftest"])
    assert report["steps"]["env"]["status"] == "fail" and "timed out" in report["steps"]["env"]["error"]
    assert report["passed"] is False


def test_unknown_step_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--rehearse", "--out", str(tmp_path), "--only", "nope"])
