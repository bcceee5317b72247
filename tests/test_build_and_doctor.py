"""The extension builds against the running torch in two parts (CPU, CUDA), a failed CUDA
part never costs the CPU kernels, and doctor and the CLI report both."""
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.utils.cpp_extension

import musefast
from musefast import _build


def test_extension_built_and_registered():
    status = _build.extension_status()
    assert status["built"], status["error"]
    assert hasattr(torch.ops.musefast, "vq_nearest")
    assert status["cpu_isa"] in ("avx512", "avx2", "baseline")


def test_doctor_reports_build_and_backends():
    report = musefast.doctor()
    assert "musefast._C CPU kernels: built" in report
    assert "musefast._C CUDA kernels: " in report
    assert "vq_nearest" in report and "cpu         ok" in report


def test_cuda_part_builds_where_a_gpu_is_visible(monkeypatch):
    """With a CUDA torch, nvcc and a visible GPU the CUDA kernels must really compile; without a
    GPU nothing is compiled (not even with nvcc at hand) and doctor says why."""
    if _build.extension() is None:
        pytest.skip(f"musefast._C is not built ({_build.extension_error()})")
    # not what an earlier test that ran without the CPU part left behind
    monkeypatch.setattr(_build, "_cuda_state", {"tried": False, "loaded": False, "error": None, "how": None,
                                                "seconds": None, "archs": None, "skipped": False})
    status = _build.extension_status()
    reason = _build.cuda_unavailable_reason()
    if reason is not None:
        assert not status["cuda_kernels"] and status["cuda_error"] == reason and status["cuda_skipped"]
        assert f"musefast._C CUDA kernels: not compiled ({reason})" in musefast.doctor()
        return
    assert status["cuda_kernels"], status["cuda_error"]
    for op in ("vq_nearest", "cfg_sample_remask"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"musefast::{op}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"musefast::{op}", "CPU")


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
    """torch <= 2.13: a build killed half-way leaves its ``lock`` file; an old one must not hang
    imports. torch 2.14+ locks the file instead: an old file is harmless and is left alone."""
    from musefast._build import STALE_LOCK_SECONDS, clear_stale_build_lock

    assert clear_stale_build_lock(tmp_path, existence_lock=True) is False  # no lock at all
    lock = tmp_path / "lock"
    lock.touch()
    assert clear_stale_build_lock(tmp_path, existence_lock=True) is False and lock.exists()  # a build may run
    old = time.time() - STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert clear_stale_build_lock(tmp_path, existence_lock=False) is False and lock.exists()
    with pytest.warns(RuntimeWarning, match="stale extension build lock"):
        assert clear_stale_build_lock(tmp_path, existence_lock=True) is True
    assert not lock.exists()


def test_stale_lock_rule_follows_the_running_torch(tmp_path):
    """Which rule applies is read from torch: its loader before 2.14 waits on the file itself."""
    waits_on_file = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)
    assert _build._torch_waits_for_lock_file() is waits_on_file
    (tmp_path / "lock").touch()
    old = time.time() - _build.STALE_LOCK_SECONDS - 5
    os.utime(tmp_path / "lock", (old, old))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert _build.clear_stale_build_lock(tmp_path) is waits_on_file


@pytest.fixture
def fresh_build_state(monkeypatch, tmp_path):
    """This process's CPU part, a CUDA part not tried yet, and a scratch cache folder."""
    module = _build.extension()
    if module is None:
        pytest.skip(f"musefast._C is not built ({_build.extension_error()})")
    monkeypatch.setenv("MUSEFAST_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_build, "_cuda_state", {"tried": False, "loaded": False, "error": None, "how": None,
                                                "seconds": None, "archs": None})
    monkeypatch.setattr(_build, "_aot_cuda_library", lambda: None)
    return module


def test_failed_cuda_build_keeps_the_cpu_kernels_warns_once_and_is_remembered(fresh_build_state, monkeypatch):
    calls = []

    def broken_build():
        calls.append(1)
        raise RuntimeError("Error building extension 'musefast_C_cuda': [1/4] nvcc ...\n"
                           "vq.cu(3): error: identifier \"nope\" is undefined\n"
                           "ninja: build stopped: subcommand failed.")

    monkeypatch.setattr(_build, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(_build, "_jit_build_cuda", broken_build)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _build.cuda_extension() is False
        assert _build.cuda_extension() is False  # tried once per process
    assert len(calls) == 1
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        f"musefast: the CUDA kernels could not be built ({_build.cuda_extension_error()}); the CPU kernels are "
        "unaffected, CUDA tensors use the Triton/PyTorch backends. `musefast doctor` says more."]
    assert _build.cuda_extension_error() == 'RuntimeError: vq.cu(3): error: identifier "nope" is undefined'
    from musefast.ops._availability import extension_reasons

    assert extension_reasons("vq_nearest", "cpu") == []
    assert "vq.cu(3): error" in extension_reasons("vq_nearest", "cuda")[0]
    assert _build.extension() is fresh_build_state
    status = _build.extension_status()
    assert status["built"] and not status["cuda_kernels"]
    record = _build.cache_dir(with_cuda=True) / "build-failed.json"
    assert "ninja: build stopped" in json.loads(record.read_text())["log"]
    # the next process does not pay for the same failing compile again, says where the log is,
    # and (its GPU is losing its kernels) warns once as well
    monkeypatch.setattr(_build, "_cuda_state", {"tried": False, "loaded": False, "error": None, "how": None,
                                                "seconds": None, "archs": None})
    with pytest.warns(RuntimeWarning, match="CUDA kernels could not be built") as caught:
        assert _build.cuda_extension() is False and _build.cuda_extension() is False
    assert len(caught) == 1 and len(calls) == 1
    assert "an earlier build failed" in _build.cuda_extension_error() and str(record) in _build.cuda_extension_error()


def test_without_nvcc_only_the_cpu_part_and_no_warning(fresh_build_state, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_build, "gpu_visible", lambda: True)
    monkeypatch.setattr(_build, "nvcc_path", lambda: None)
    monkeypatch.setattr(_build, "_jit_build_cuda", lambda: pytest.fail("no nvcc: nothing to compile"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _build.cuda_extension() is False
    assert _build.cuda_extension_error() == "nvcc not found; set CUDA_HOME"
    assert _build.extension_status()["built"]


def test_default_cuda_architectures_without_a_visible_gpu(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", "/opt/cuda")
    monkeypatch.setattr(_build, "nvcc_path", lambda: "nvcc")
    nvcc = frozenset({"7.5", "8.0", "8.6", "9.0", "10.0", "12.0"})
    monkeypatch.setattr(_build, "_nvcc_archs", lambda _: nvcc)
    monkeypatch.setattr(_build, "_torch_archs", lambda: {"7.5", "8.0", "8.6", "9.0", "10.0", "12.0"})
    assert _build.cuda_archs() == ("8.0;9.0+PTX", "default (no visible GPU)")
    flags = _build.cuda_arch_flags()
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
    # explicit flags make torch's builder skip its own choice, which needs a visible device
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    assert _get_cuda_arch_flags(_build._flags(native=True)[1] + flags) == []
    # intersected with what torch and nvcc support
    monkeypatch.setattr(_build, "_torch_archs", lambda: {"7.5", "8.0", "8.6"})
    assert _build.cuda_archs()[0] == "8.0+PTX"
    monkeypatch.setattr(_build, "_nvcc_archs", lambda _: frozenset({"10.0", "12.0"}))
    assert _build.cuda_archs()[0] == ""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "TORCH_CUDA_ARCH_LIST" in _build.cuda_unavailable_reason(need_gpu=False)  # ahead of time
    # the user's list wins, is left to torch's builder, and keys the cache
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert _build.cuda_archs() == ("8.9", "TORCH_CUDA_ARCH_LIST") and _build.cuda_arch_flags() == []


def test_cuda_cache_folder_is_keyed_by_architectures(monkeypatch, tmp_path):
    monkeypatch.setenv("MUSEFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    first = _build.cache_dir(with_cuda=True)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    second = _build.cache_dir(with_cuda=True)
    assert first != second and first != _build.cache_dir() and "sm8.0_9.0ptx" in first.name


def test_nvcc_lists_its_architectures():
    nvcc = _build.nvcc_path()
    if nvcc is None:
        pytest.skip("no nvcc")
    archs = _build._nvcc_archs(nvcc)
    assert archs and all(a.count(".") == 1 for a in archs) and "9.0" in archs


def test_build_failure_summary_is_the_compilers_first_error():
    log = ("Error building extension 'musefast_C_cuda': [1/5] nvcc -gencode=arch=compute_70,code=sm_70 -c vq.cu\n"
           "FAILED: [code=1] vq.cuda.o\n"
           "nvcc fatal   : Unsupported gpu architecture 'compute_70'\n"
           "ninja: build stopped: subcommand failed.")
    assert _build._summary(RuntimeError(log)) == "RuntimeError: nvcc fatal   : Unsupported gpu architecture 'compute_70'"
    assert _build._summary(IndexError("list index out of range")) == "IndexError: list index out of range"
