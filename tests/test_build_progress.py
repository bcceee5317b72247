"""A build of musefast._C says on stderr what it compiles and for how long, never compiles CUDA
kernels where no GPU is visible, and a cache hit stays silent. Cheap: the slow builds here are
fakes; the one real build used is the CPU part this test run has already compiled."""
import io
import os
import subprocess
import sys
import time

import pytest
import torch

from musefast import _build, _build_progress
from musefast.doctor import _build_lines


def _wait_for(predicate, timeout=60.0):
    """Poll until ``predicate()``; the fake builds below end only when the lines they wait for
    were printed, so no assertion depends on how busy the machine is."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for build progress lines")
        time.sleep(0.01)


def _progress_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("... still compiling")]


@pytest.fixture(autouse=True)
def _progress_on(monkeypatch):
    monkeypatch.delenv("MUSEFAST_BUILD_PROGRESS", raising=False)


def test_a_slow_build_prints_start_progress_and_end_lines():
    out = io.StringIO()
    with _build_progress.reporting("the C++ CPU kernels", "first use, cached in /c", expect_compile=True,
                                   interval=0.05, stream=out):
        assert out.getvalue() == "musefast: compiling the C++ CPU kernels (first use, cached in /c) ...\n"
        _wait_for(lambda: len(_progress_lines(out.getvalue())) >= 2)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("musefast: compiling the C++ CPU kernels")
    assert all(line.startswith("... still compiling the C++ CPU kernels: ") and line.endswith(" s")
               for line in lines[1:-1]) and len(lines) >= 4
    assert lines[-1].startswith("musefast: compiled the C++ CPU kernels in ") and lines[-1].endswith(" s")
    time.sleep(0.15)  # the progress thread is finished: nothing comes after the end line
    assert out.getvalue().splitlines() == lines


def test_a_failed_build_ends_with_its_time_and_one_line_reason():
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="ninja"):
        with _build_progress.reporting("the CUDA kernels for sm_90", "first use", expect_compile=True,
                                       describe_error=_build._summary, stream=out):
            raise RuntimeError("Error building extension 'musefast_C_cuda': [1/4] nvcc ...\n"
                               "vq.cu(3): error: identifier \"nope\" is undefined\n"
                               "ninja: build stopped: subcommand failed.")
    start, end = out.getvalue().splitlines()
    assert start == "musefast: compiling the CUDA kernels for sm_90 (first use) ..."
    assert end.startswith("musefast: compiling the CUDA kernels for sm_90 failed after ")
    assert end.endswith(' s: RuntimeError: vq.cu(3): error: identifier "nope" is undefined')


def test_a_cache_hit_is_silent_and_unexpected_work_is_announced_late():
    out = io.StringIO()
    with _build_progress.reporting("X", "cached in /c", expect_compile=False, grace=30.0, stream=out):
        pass
    assert out.getvalue() == ""
    with _build_progress.reporting("X", "cached in /c", expect_compile=False, grace=0.05, interval=30.0,
                                   stream=out):
        _wait_for(lambda: out.getvalue())
    assert out.getvalue().splitlines()[0] == "musefast: compiling X (cached in /c) ..."
    assert out.getvalue().splitlines()[-1].startswith("musefast: compiled X in ")


def test_quiet_mode_and_its_override(monkeypatch):
    out = io.StringIO()
    with _build_progress.quiet(), _build_progress.reporting("X", "y", expect_compile=True, stream=out):
        pass
    assert out.getvalue() == ""
    with _build_progress.quiet(False), _build_progress.reporting("X", "y", expect_compile=True, stream=out):
        pass
    assert out.getvalue().count("musefast: ") == 2
    monkeypatch.setenv("MUSEFAST_BUILD_PROGRESS", "1")  # a way to see a quiet command's wait
    with _build_progress.quiet(), _build_progress.reporting("X", "y", expect_compile=True, stream=out):
        pass
    assert out.getvalue().count("musefast: ") == 4
    monkeypatch.setenv("MUSEFAST_BUILD_PROGRESS", "0")
    with _build_progress.reporting("X", "y", expect_compile=True, stream=out):
        pass
    assert out.getvalue().count("musefast: ") == 4


@pytest.fixture
def cold_cpu_state(monkeypatch, tmp_path):
    """A process that has not tried the CPU part yet, with an empty cache and no ahead-of-time build."""
    monkeypatch.setenv("MUSEFAST_CACHE", str(tmp_path))
    monkeypatch.delenv("MUSEFAST_NO_EXT", raising=False)
    monkeypatch.setattr(_build, "_state", {"tried": False, "module": None, "error": None, "how": None,
                                           "seconds": None})
    monkeypatch.setitem(sys.modules, "musefast._C", None)  # `from musefast import _C` raises ImportError
    monkeypatch.setattr(_build_progress, "INTERVAL_S", 0.05)
    return tmp_path


def test_first_build_lines_in_order(cold_cpu_state, monkeypatch):
    """The whole sequence as a user sees it, through the real extension() wiring."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)

    def slow_build():
        _wait_for(lambda: len(_progress_lines(out.getvalue())) >= 2)
        (_build.cache_dir() / f"{_build.EXTENSION_NAME}.so").write_bytes(b"")
        return "module"

    monkeypatch.setattr(_build, "_jit_build", slow_build)
    assert _build.extension() == "module"
    lines = out.getvalue().splitlines()
    assert lines[0] == f"musefast: compiling the C++ CPU kernels (first use, cached in {_build.cache_dir()}) ..."
    assert len(_progress_lines(out.getvalue())) >= 2
    assert lines[1].startswith("... still compiling the C++ CPU kernels: ")
    assert lines[-1].startswith("musefast: compiled the C++ CPU kernels in ")


def test_failed_cpu_build_says_why_and_musefast_runs_on(cold_cpu_state, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)

    def broken_build():
        raise RuntimeError("Error building extension 'musefast_C': [1/9] c++ ...\n"
                           "vq.cpp:3:1: error: 'nope' was not declared in this scope\n"
                           "ninja: build stopped: subcommand failed.")

    monkeypatch.setattr(_build, "_jit_build", broken_build)
    assert _build.extension() is None
    start, end = out.getvalue().splitlines()
    assert start.startswith("musefast: compiling the C++ CPU kernels (first use")
    assert end.startswith("musefast: compiling the C++ CPU kernels failed after ")
    assert end.endswith(" s: RuntimeError: vq.cpp:3:1: error: 'nope' was not declared in this scope")
    assert end.endswith(f" s: {_build.extension_error()}")  # doctor gives the same reason


def test_a_build_of_an_up_to_date_library_is_silent(cold_cpu_state, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    library = _build.cache_dir() / f"{_build.EXTENSION_NAME}.so"
    library.write_bytes(b"")
    later = time.time() + 60  # newer than every source
    os.utime(library, (later, later))
    monkeypatch.setattr(_build, "_jit_build", lambda: "module")
    assert _build.extension() == "module" and out.getvalue() == ""
    assert _build._state["how"] == f"just-in-time (loaded from the cache in {_build.cache_dir()})"


def test_cuda_part_reports_its_architectures_where_a_gpu_is_visible(cold_cpu_state, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setattr(_build, "_state", {"tried": True, "module": "cpu part", "error": None, "how": None,
                                           "seconds": None})
    monkeypatch.setattr(_build, "_cuda_state", {"tried": False, "loaded": False, "error": None, "how": None,
                                                "seconds": None, "archs": None, "skipped": False})
    monkeypatch.setattr(_build, "_aot_cuda_library", lambda: None)
    monkeypatch.setattr(_build, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")

    def slow_build():
        _wait_for(lambda: len(_progress_lines(out.getvalue())) >= 1)
        (_build.cache_dir(with_cuda=True) / f"{_build.CUDA_EXTENSION_NAME}.so").write_bytes(b"")

    monkeypatch.setattr(_build, "_jit_build_cuda", slow_build)
    assert _build.cuda_extension() is True
    lines = out.getvalue().splitlines()
    assert lines[0] == (f"musefast: compiling the CUDA kernels for sm_90 (first use, cached in "
                        f"{_build.cache_dir(with_cuda=True)}) ...")
    assert lines[1].startswith("... still compiling the CUDA kernels for sm_90: ")
    assert lines[-1].startswith("musefast: compiled the CUDA kernels for sm_90 in ")


def test_no_cuda_compile_without_a_visible_gpu_even_with_cuda_torch_and_nvcc(cold_cpu_state, monkeypatch):
    monkeypatch.setattr(_build, "_state", {"tried": True, "module": "cpu part", "error": None, "how": None,
                                           "seconds": None})
    monkeypatch.setattr(_build, "_cuda_state", {"tried": False, "loaded": False, "error": None, "how": None,
                                                "seconds": None, "archs": None, "skipped": False})
    monkeypatch.setattr(_build, "_aot_cuda_library", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # the default pip wheel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(_build, "nvcc_path", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(_build, "_jit_build_cuda", lambda: pytest.fail("compiled CUDA kernels without a GPU"))
    assert _build.cuda_extension() is False
    assert _build.cuda_extension_error() == _build.NO_GPU
    assert not _build._cuda_needed_now()
    assert not [p for p in (cold_cpu_state / "ext").glob("*") if "-cu" in p.name]
    status = {"built": False, "error": "x", "cuda_kernels": False, "cuda_error": _build.cuda_extension_error(),
              "cuda_skipped": True}
    assert _build_lines(status)[1] == "musefast._C CUDA kernels: not compiled (no GPU visible)"
    # a device that is there but hidden counts as none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _build.cuda_unavailable_reason() == _build.NO_GPU
    # an ahead-of-time build is asked for explicitly and may target another machine's GPUs
    assert _build.cuda_unavailable_reason(need_gpu=False) != _build.NO_GPU


def test_doctor_on_a_built_cache_says_cached_and_compiles_no_cuda(tmp_path):
    """The real CPU part this run built, reached through a fresh cache folder; CUDA hidden; a
    CUDA_HOME whose nvcc records any call. Nothing may be compiled, nvcc must not even run."""
    if _build.extension() is None or not _build._state["how"] or "just-in-time" not in _build._state["how"]:
        pytest.skip(f"no just-in-time build of the CPU part here ({_build.extension_error() or _build._state['how']})")
    built = _build.cache_dir()
    (tmp_path / "cache" / "ext").mkdir(parents=True)
    (tmp_path / "cache" / "ext" / built.name).symlink_to(built)
    marker = tmp_path / "nvcc-ran"
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    nvcc.chmod(0o755)
    env = {**os.environ, "MUSEFAST_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "",
           "CUDA_HOME": str(nvcc.parent.parent), "PATH": f"{nvcc.parent}:{os.environ['PATH']}"}
    env.pop("MUSEFAST_BUILD_PROGRESS", None)
    proc = subprocess.run([sys.executable, "-m", "musefast.cli", "doctor"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"musefast._C CPU kernels: built just-in-time (loaded from the cache in {tmp_path / 'cache'}" in proc.stdout
    if torch.version.cuda is not None:
        assert "musefast._C CUDA kernels: not compiled (no GPU visible)" in proc.stdout
    assert "compiling" not in proc.stderr, proc.stderr
    assert not marker.exists(), marker.read_text()
    assert [p.name for p in (tmp_path / "cache" / "ext").iterdir()] == [built.name]


def test_a_process_waiting_for_the_background_build_says_so(cold_cpu_state, monkeypatch):
    """`musefast generate` compiles in a detached process; another command that needs the kernels
    meanwhile waits for it, and says whose build it waits for. The build itself does not."""
    log, pid_file = _build._background_files()
    pid_file.write_text(str(os.getppid()))  # a live process other than this one
    assert _build._background_build_log() == log
    expect, why = _build._why_compile(_build.cache_dir(), _build.cache_dir() / "musefast_C.so", False)
    assert expect and why == f"waiting for the build another musefast process started; its log: {log}"
    pid_file.write_text(str(os.getpid()))  # the background build reading its own pid file
    assert _build._background_build_log() is None
    assert _build._why_compile(_build.cache_dir(), _build.cache_dir() / "musefast_C.so", False)[1].startswith(
        "first use, cached in ")


_FAKE_BUILD_PLUGIN = '''
import time
from musefast import _build, _build_progress

_build_progress.INTERVAL_S = 0.2


def _slow_build():
    time.sleep(0.9)
    (_build.cache_dir() / (_build.EXTENSION_NAME + ".so")).write_bytes(b"")
    return object()


_build._jit_build = _slow_build
'''


def test_pytest_shows_the_build_lines_before_the_first_test(tmp_path):
    """Inside a test pytest would capture them: the first build happens when the test run starts, where
    the lines reach the terminal. A fake build keeps this cheap."""
    (tmp_path / "fake_build_plugin.py").write_text(_FAKE_BUILD_PLUGIN)
    env = {**os.environ, "MUSEFAST_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    for name in ("MUSEFAST_NO_EXT", "MUSEFAST_BUILD_PROGRESS"):
        env.pop(name, None)
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fake_build_plugin", "-p", "no:cacheprovider",
                           f"{here}/test_build_progress.py::test_quiet_mode_and_its_override"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=os.path.dirname(here))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("musefast: compiling the C++ CPU kernels (first use, cached in "), proc.stderr
    assert lines[1].startswith("... still compiling the C++ CPU kernels: ")
    assert lines[-1].startswith("musefast: compiled the C++ CPU kernels in ")


@pytest.mark.parametrize("quiet", [True, False])
def test_generate_waiting_for_the_build_is_quiet_only_with_q(cold_cpu_state, monkeypatch, capsys, quiet):
    from musefast.cli import main

    def fake_build():  # the kernels this process may already have loaded stay registered
        (_build.cache_dir() / f"{_build.EXTENSION_NAME}.so").write_bytes(b"")
        return object()

    monkeypatch.setattr(_build, "_jit_build", fake_build)
    out = cold_cpu_state / "a.png"
    args = ["generate", "a red circle", "-o", str(out), "--steps", "2", "--wait-for-build"] + (["-q"] if quiet else [])
    assert main(args) == 0 and out.is_file()
    err = capsys.readouterr().err
    assert ("musefast: compiling the C++ CPU kernels (first use" in err) is not quiet, err
