"""Per-device self-check of compiled backends: a backend earns trust on a device by matching the reference."""
import json
import subprocess
import sys
import time
import warnings

import pytest
import torch

from musefast import ops
from musefast.ops import registry, selfcheck, verdicts as verdict_store
from musefast.ops.registry import BackendUnavailableError


@pytest.fixture
def verdicts(tmp_path, monkeypatch):
    """A private verdict file, so these tests neither read nor disturb the user's cache."""
    monkeypatch.setattr(verdict_store, "verdict_file", lambda: tmp_path / "selfcheck.json")
    monkeypatch.delenv("MUSEFAST_SELFCHECK", raising=False)
    verdict_store.forget()
    yield tmp_path / "selfcheck.json"
    verdict_store.forget()


@pytest.fixture
def wrong_vq_backend():
    """A deliberately wrong compiled VQ backend, first in the CPU order: it returns index 0."""
    the_op = registry.op("vq_nearest")
    saved = dict(the_op.backends)

    def wrong(z, codebook):
        indices = torch.zeros(z.shape[0], dtype=torch.int64)
        return indices, (z.double() - codebook.double()[0]).pow(2).sum(-1).float()

    the_op.backends = {"wrong": None, **saved}
    the_op.register("wrong", wrong, lambda z, codebook: [], auto_devices=("cpu",), compiled=True)
    yield
    the_op.backends = saved


def test_wrong_backend_is_disabled_with_one_warning_and_results_stay_right(verdicts, wrong_vq_backend):
    z, codebook = torch.randn(50, 16), torch.randn(64, 16)
    expected = ops.vq_nearest(z, codebook, backend="reference")
    with pytest.warns(RuntimeWarning, match="'wrong' of vq_nearest disagrees with the reference") as record:
        got = ops.vq_nearest(z, codebook)
    assert torch.equal(got, expected)  # the next backend ran
    assert len([w for w in record if "disagrees" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the verdict is remembered
        assert torch.equal(ops.vq_nearest(z, codebook), expected)
    table = ops.backends("cpu")["vq_nearest"]
    assert "failed the self-check" in table["wrong"]
    # asked for by name, a disabled backend refuses with the reason
    with pytest.raises(BackendUnavailableError, match="failed the self-check"):
        ops.vq_nearest(z, codebook, backend="wrong")
    # the verdict is cached on disk for this device and software
    on_disk = json.loads(verdicts.read_text())
    (key, verdict), = [(k, v) for k, v in on_disk.items() if k.startswith("vq_nearest|wrong|")]
    assert not verdict["ok"] and "cpu:" in key and "torch" in key
    # a new process (simulated) reads it back without re-running the check
    verdict_store.forget()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ops.vq_nearest(z, codebook), expected)


def test_crashing_backend_is_disabled(verdicts):
    the_op = registry.op("cfg_sample_remask")
    saved = dict(the_op.backends)

    def crash(*args):
        raise RuntimeError("illegal memory access")

    the_op.backends = {"crashy": None, **saved}
    the_op.register("crashy", crash, lambda *a: [], auto_devices=("cpu",), compiled=True)
    try:
        logits = torch.randn(1, 6, 9)
        with pytest.warns(RuntimeWarning, match="illegal memory access"):
            tokens, masked = ops.cfg_sample_remask(
                logits, tokens=torch.zeros(1, 6, dtype=torch.long), masked=torch.ones(1, 6, dtype=torch.bool),
                num_to_mask=2, seed=0, step=0)
        assert int(masked.sum()) == 2
    finally:
        the_op.backends = saved


def test_selfcheck_can_be_switched_off(verdicts, wrong_vq_backend, monkeypatch):
    monkeypatch.setenv("MUSEFAST_SELFCHECK", "0")
    z, codebook = torch.randn(8, 4) + 5, torch.randn(64, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ops.vq_nearest(z, codebook)
    assert bool((got == 0).all())  # unchecked: the wrong backend ran, as the user asked
    assert not verdicts.exists()


# A check's cost is its CPU time on one thread, in units of a fixed small-op loop timed in the same
# process. On more threads a busy machine bills spin-waiting as CPU time: on a 2-core machine at
# load 10-12, the Triton vq check took 0.07-0.08 s on one thread and 0.63-0.68 s on two (a fixed
# 1 s limit failed on such a machine). One thread's CPU time hardly moves with load (the anchor:
# 0.026-0.028 s there, on one thread or two), and the ratio follows a slower CPU. 40 anchors = about
# 1.1 s there; the dearest check (Triton interpreter, qk_norm_rope) took 0.44-0.53 s.
_CHECK_COST_LIMIT_IN_ANCHORS = 40
_ONE_THREAD_SELFTEST = """
import dataclasses, json, pathlib, sys, time, torch
from musefast.ops import selfcheck, verdicts
verdicts.verdict_file = lambda: pathlib.Path(sys.argv[1])  # not the user's cache
def anchor():
    x = torch.arange(64, dtype=torch.float32)
    start = time.process_time()
    for _ in range(5000):
        x = (x * 0.5 + 1.0).clamp_(max=100.0)
    return time.process_time() - start
results = [dataclasses.asdict(r) for r in selfcheck.selftest("cpu")]
print(json.dumps({"anchor_s": min(anchor() for _ in range(3)), "results": results}))
"""


@pytest.fixture(scope="module")
def one_thread_selftest(tmp_path_factory):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MUSEFAST_SELFCHECK": "1"}
    proc = subprocess.run([sys.executable, "-c", _ONE_THREAD_SELFTEST, str(tmp_path_factory.mktemp("v") / "s.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op_name", ["vq_nearest", "cfg_sample_remask", "attention", "qk_norm_rope", "rms_norm_modulate"])
def test_real_cpu_backends_pass_and_each_check_costs_under_a_second(one_thread_selftest, op_name):
    results = [selfcheck.Result(**r) for r in one_thread_selftest["results"] if r["op"] == op_name]
    assert results, f"no backend of {op_name} was checked or reported"
    checked = [r for r in results if r.status != "skip"]
    limit = _CHECK_COST_LIMIT_IN_ANCHORS * one_thread_selftest["anchor_s"]
    for r in checked:
        assert r.status == "pass", f"{r.backend}: {r.detail}"
        assert r.seconds < limit, f"{op_name}/{r.backend} self-check took {r.seconds:.2f}s (limit {limit:.2f}s)"
    if op_name != "attention":  # attention has no compiled CPU backend; sdpa is checked all the same
        assert any(r.backend == "cpu" for r in checked), "the C++ backend was not checked"


def test_checks_catch_subtle_bugs(verdicts):
    """Each check must be able to fail: feed it results that are wrong in one awkward place."""
    from musefast.reference import agreement

    z, codebook = torch.randn(20, 8), torch.randn(30, 8)
    z[3] = float("nan")
    idx, dist = ops.vq_nearest(z, codebook, return_distance=True, backend="reference")
    assert agreement.vq_disagreement(z, codebook, idx, dist, idx, dist) is None
    bad_nan = dist.clone()
    bad_nan[3] = 0.0  # a NaN row clamped to 0 (fmaxf / tl.maximum drop NaN on GPUs)
    assert "NaN" in agreement.vq_disagreement(z, codebook, idx, bad_nan, idx, dist)
    worse = idx.clone()
    worse[5] = (idx[5] + 1) % 30
    assert agreement.vq_disagreement(z, codebook, worse, dist, idx, dist) is not None

    q = torch.randn(1, 2, 5, 8)
    mask = torch.tensor([[False, False, False]])
    k = torch.randn(1, 2, 3, 8)
    ref = ops.attention(q, k, k, key_padding_mask=mask, backend="reference")
    assert agreement.attention_disagreement(ref, ref, ref, mask) is None
    assert "zeros" in agreement.attention_disagreement(ref + 1e-3, ref, ref, mask)

    x = torch.randn(2, 3, 16)
    exact = ops.rms_norm_modulate(x, 1e-6, backend="reference").double()
    same = ops.rms_norm_modulate(x, 1e-6, backend="reference")
    assert agreement.rms_norm_disagreement(same, exact, same) is None
    assert "max error" in agreement.rms_norm_disagreement(same * (1 + 1e-4), exact, same)
    assert "dtype" in agreement.rms_norm_disagreement(same.bfloat16(), exact, same)


def test_doctor_selftest_cli_passes_on_cpu(tmp_path):
    env = {**__import__("os").environ, "MUSEFAST_SELFCHECK": "1"}
    # The wall time of a command says little on a shared machine by itself; the anchor is plain
    # `musefast doctor` just before (the same imports and extension load, and it builds a cold
    # cache). Measured on a 2-core machine at load 12: 18-21 s against 10-12 s, so 10x is a hung or
    # autotuning check, not load (a fixed limit of 120 s failed on a loaded machine).
    start = time.perf_counter()
    anchor = subprocess.run([sys.executable, "-m", "musefast.cli", "doctor"], capture_output=True, text=True,
                            env=env, timeout=600)
    anchor_s = time.perf_counter() - start
    assert anchor.returncode == 0, anchor.stderr
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "musefast.cli", "doctor", "--selftest"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pass vq_nearest" in proc.stdout.replace("  ", " ") or "pass" in proc.stdout
    assert " 0 failed" in proc.stdout
    assert time.perf_counter() - start < 10 * anchor_s, f"doctor --selftest took {time.perf_counter() - start:.0f}s, " \
                                                        f"doctor {anchor_s:.0f}s"
