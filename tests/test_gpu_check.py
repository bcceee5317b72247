"""scripts/gpu_check.py: order and budget, reports, timeouts that leave nothing behind, no git,
offline wheels; on CPU.

The full rehearsal (``python scripts/gpu_check.py --rehearse --out DIR``, every step) runs in
CI on its own; here fast subsets and stand-in steps check what a run on a GPU machine relies on.
"""
import json
import os
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check  # noqa: E402
import gpu_check_steps  # noqa: E402

HEADLINE = ["decode_step", "amused_e2e", "meissonic_1024"]


def _check_shape(report: dict, steps: list[str]) -> None:
    assert report["kind"] == "rehearsal" and report["complete"] is True
    assert set(report) >= {"started", "budget_s", "environment", "steps", "wall_s", "passed", "unproven_without_gpu"}
    assert list(report["steps"]) == steps
    for step in report["steps"].values():
        assert set(step) >= {"status", "wall_s", "cpu_s", "figures", "error"}
        assert step["status"] in ("pass", "fail", "skipped") and step["wall_s"] >= 0


def test_every_step_has_an_implementation():
    assert gpu_check.STEP_NAMES == list(gpu_check_steps.STEPS)


def test_headline_figures_come_first_and_keep_their_share_of_the_budget():
    names = gpu_check.STEP_NAMES
    long_ones = ["selftest", "bench_remask", "bench_attention", "bench_vq", "pytest_gpu"]
    assert max(names.index(n) for n in HEADLINE) < min(names.index(n) for n in long_ones)
    assert names[-1] == "pytest_gpu"
    assert gpu_check.BUDGET_S <= 8 * 60
    # Worst case: every step runs to its timeout. Each still gets at least its reserve, and the
    # figure steps their reserve of at least 30 s.
    steps, left = gpu_check.STEPS, gpu_check.BUDGET_S
    for i, step in enumerate(steps):
        timeout = gpu_check.step_timeout(steps, i, left, rehearse=False)
        assert timeout >= step.reserve_s, step.name
        if step.name in HEADLINE:
            assert timeout >= 30, step.name
        left -= timeout
    assert left >= 0
    table = gpu_check.plan_table(steps, gpu_check.BUDGET_S, rehearse=False).splitlines()
    assert len(table) == len(steps) + 1 and table[-1].split()[0] == "pytest_gpu"


def test_a_step_never_eats_the_reserve_of_later_ones():
    steps = [gpu_check.Step("a", 100, 0, ""), gpu_check.Step("b", 50, 20, "", rehearsal_scale=3.0),
             gpu_check.Step("c", 50, 30, "")]
    assert gpu_check.step_timeout(steps, 0, 200, rehearse=False) == 100  # its cap
    assert gpu_check.step_timeout(steps, 0, 120, rehearse=False) == 70  # 120 - 20 - 30
    assert gpu_check.step_timeout(steps, 0, 120, rehearse=True) == 30  # b's reserve scaled: 120 - 60 - 30
    assert gpu_check.step_timeout(steps, 1, 500, rehearse=True) == 150  # b's cap scaled
    assert gpu_check.default_budget(False) == gpu_check.BUDGET_S
    assert gpu_check.default_budget(True) > gpu_check.BUDGET_S  # the build's cap, scaled


def test_every_step_pins_one_triton_config():
    for name in gpu_check.STEP_NAMES:
        for rehearse in (False, True):
            assert gpu_check.step_env(name, rehearse)["MUSEFAST_TRITON_FIXED_CONFIG"] == "1", name


def test_rehearsal_subset_writes_the_report_and_streams_the_selftest(tmp_path, capsys):
    code = gpu_check.main(["--rehearse", "--out", str(tmp_path), "--only", "env,selftest"])
    report = json.loads((tmp_path / gpu_check.REPORT_NAME).read_text())
    _check_shape(report, ["env", "selftest"])
    assert code == 0 and report["passed"], report
    env = report["environment"]
    assert env["torch"] and env["cuda_available"] is False and env["python"].count(".") == 2
    assert env["triton_fixed_config"] is True
    selftest = report["steps"]["selftest"]
    assert selftest["status"] == "pass" and selftest["figures"]["passed"] > 0
    assert selftest["figures"]["lines"][0].startswith("musefast self-test on cpu")
    log = (tmp_path / gpu_check.LOG_NAME).read_text()
    assert "===== env: pass" in log and "musefast self-test on cpu" in log
    out = capsys.readouterr().out
    assert "[selftest]   pass " in out  # each check's line, prefixed, as it came
    assert "GPU-only, still unproven by this rehearsal:" in out and "selftest:" in out


def test_env_needs_no_git(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"  # a PATH with no git (nor anything else) on it
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    code = gpu_check.main(["--rehearse", "--out", str(tmp_path / "out"), "--only", "env"])
    report = json.loads((tmp_path / "out" / gpu_check.REPORT_NAME).read_text())
    assert code == 0, report["steps"]["env"]
    commit = report["environment"]["musefast_commit"]
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)


def test_commit_id_reads_git_files(tmp_path):
    sha, other = "a" * 40, "b" * 40
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert gpu_check_steps.commit_id(repo) == "unknown"  # a ref with no file and no packed-refs
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/main\n")
    assert gpu_check_steps.commit_id(repo) == sha
    (repo / ".git" / "refs" / "heads" / "main").write_text(other + "\n")
    assert gpu_check_steps.commit_id(repo) == other
    # a worktree: .git is a file pointing at its own folder, whose commondir is the main .git
    tree, wt_git = tmp_path / "tree", repo / ".git" / "worktrees" / "tree"
    wt_git.mkdir(parents=True)
    tree.mkdir()
    (tree / ".git").write_text(f"gitdir: {wt_git}\n")
    (wt_git / "commondir").write_text("../..\n")
    (wt_git / "HEAD").write_text("ref: refs/heads/main\n")
    assert gpu_check_steps.commit_id(tree) == other
    (wt_git / "HEAD").write_text(sha + "\n")  # detached
    assert gpu_check_steps.commit_id(tree) == sha
    assert gpu_check_steps.commit_id(tmp_path / "no-repo") == "unknown"


# A stand-in step: "hang" spawns a child, takes an extension build lock as torch's builder
# does, says so and sleeps past its timeout; "quick" writes a passing result at once.
FAKE_STEP = textwrap.dedent('''
    import json, os, subprocess, sys, time
    from pathlib import Path
    name, result, pids = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if name == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        pids.write_text(f"{os.getpid()} {child.pid}")
        lock = Path(os.environ["MUSEFAST_CACHE"]) / "ext" / "fake-build" / "lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR))
        print("holding the build lock", flush=True)
        time.sleep(300)
    result.write_text(json.dumps({"status": "pass", "figures": {"lock_seen": (
        Path(os.environ["MUSEFAST_CACHE"]) / "ext" / "fake-build" / "lock").exists()}, "error": None}))
''')


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_timed_out_step_leaves_no_process_and_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSEFAST_CACHE", str(tmp_path / "cache"))
    old_lock = tmp_path / "cache" / "ext" / "other-build" / "lock"  # not the step's: left alone
    old_lock.parent.mkdir(parents=True)
    old_lock.touch()
    os.utime(old_lock, (time.time() - 3600, time.time() - 3600))
    script, pids = tmp_path / "fake_step.py", tmp_path / "pids"
    script.write_text(FAKE_STEP)
    monkeypatch.setattr(gpu_check, "step_command",
                        lambda name, result, *_: [sys.executable, str(script), name, str(result), str(pids)])
    steps = [gpu_check.Step("hang", 3, 0, ""), gpu_check.Step("quick", 60, 0, "")]
    start = time.perf_counter()
    report = gpu_check.run(tmp_path / "out", rehearse=True, budget_s=120, steps=steps)
    assert time.perf_counter() - start < 60  # the second step did not wait on the lock
    hang, quick = report["steps"]["hang"], report["steps"]["quick"]
    assert hang["status"] == "fail" and "timed out" in hang["error"], hang
    assert "holding the build lock" in hang["output_tail"]  # streamed before the kill
    assert hang["removed_build_locks"] == [str(tmp_path / "cache" / "ext" / "fake-build" / "lock")]
    step_pid, child_pid = map(int, pids.read_text().split())
    assert not _alive(step_pid) and not _alive(child_pid)
    assert not (tmp_path / "cache" / "ext" / "fake-build" / "lock").exists() and old_lock.exists()
    assert quick["status"] == "pass" and quick["figures"] == {"lock_seen": False}
    assert report["passed"] is False


def _wheel(folder: Path, name: str, requires: list[str]) -> Path:
    """A minimal pure-Python wheel of module ``name``."""
    dist = f"{name}-0.1.dist-info"
    path = folder / f"{name}-0.1-py3-none-any.whl"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: 0.1\n{}".format(
                 name, "".join(f"Requires-Dist: {r}\n" for r in requires)),
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for f, text in files.items():
            zf.writestr(f, text)
    return path


def test_wheelhouse_installs_offline_first(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "musefast_probe_wheel", [])
    (wheels / "requirements.txt").write_text("musefast_probe_wheel\n")
    site = tmp_path / "site"
    monkeypatch.setenv("PIP_TARGET", str(site))  # pip's --target: nothing lands in this environment
    code = gpu_check.main(["--rehearse", "--out", str(tmp_path / "out"), "--only", "wheels",
                           "--wheelhouse", str(wheels)])
    report = json.loads((tmp_path / "out" / gpu_check.REPORT_NAME).read_text())
    assert code == 0, report["steps"]["wheels"]
    assert (site / "musefast_probe_wheel.py").is_file()
    assert report["steps"]["wheels"]["figures"]["wheelhouse_files"] == ["musefast_probe_wheel-0.1-py3-none-any.whl"]


def test_wheelhouse_missing_a_dependency_fails_in_one_line(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "musefast_probe_wheel", ["musefast-no-such-dependency"])
    monkeypatch.setenv("PIP_TARGET", str(tmp_path / "site"))
    code = gpu_check.main(["--rehearse", "--out", str(tmp_path / "out"), "--only", "wheels",
                           "--wheelhouse", str(wheels)])
    step = json.loads((tmp_path / "out" / gpu_check.REPORT_NAME).read_text())["steps"]["wheels"]
    assert code == 1 and step["status"] == "fail"
    assert "musefast-no-such-dependency" in step["error"] and "--no-index" in step["error"]


def test_without_wheelhouse_the_wheels_step_is_skipped(tmp_path):
    report = gpu_check.run(tmp_path, rehearse=True, only=["wheels"])
    assert report["steps"]["wheels"]["status"] == "skipped" and report["passed"]


@pytest.mark.parametrize("argv, message", [
    (["--only", "nope"], "unknown step"),
    (["--wheelhouse", "/no/such/folder"], "no folder of .whl files"),
    (["--budget", "0"], "--budget must be a positive"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        gpu_check.main(["--rehearse", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
