"""Backend registry: ordering, reasons, explicit requests, MUSEFAST_BACKEND, backends()."""
import pytest
import torch

from musefast import ops
from musefast.ops import registry
from musefast.ops.registry import BackendUnavailableError, Op


@pytest.fixture(autouse=True)
def _forget_toy_ops():
    yield
    registry._OPS.pop("toy", None)


def _toy_op():
    calls = []
    the_op = registry.op("toy")
    the_op.register("fast", lambda x: calls.append("fast") or x + 1, lambda x: [] if x.numel() < 10 else ["too big"])
    the_op.register("gpu_only", lambda x: calls.append("gpu_only"), lambda x: [], auto_devices=("cuda",))
    the_op.register("reference", lambda x: calls.append("reference") or x + 1, lambda x: [])
    return the_op, calls


def test_auto_picks_first_backend_without_reasons():
    the_op, calls = _toy_op()
    the_op(torch.zeros(3), device_type="cpu")
    the_op(torch.zeros(30), device_type="cpu")
    assert calls == ["fast", "reference"]  # gpu_only never auto-selected for cpu tensors


def test_requested_backend_never_falls_back():
    the_op, calls = _toy_op()
    with pytest.raises(BackendUnavailableError, match="'fast' cannot run these inputs: too big"):
        the_op(torch.zeros(30), backend="fast", device_type="cpu")
    assert calls == []
    the_op(torch.zeros(3), backend="gpu_only", device_type="cpu")  # asked for: it may run
    assert calls == ["gpu_only"]


def test_env_var_single_name_and_per_op(monkeypatch):
    the_op, calls = _toy_op()
    monkeypatch.setenv("MUSEFAST_BACKEND", "reference")
    the_op(torch.zeros(3), device_type="cpu")
    monkeypatch.setenv("MUSEFAST_BACKEND", "sdpa")  # a name this op lacks: auto-select
    the_op(torch.zeros(3), device_type="cpu")
    monkeypatch.setenv("MUSEFAST_BACKEND", "vq_nearest=cpu,toy=reference")
    the_op(torch.zeros(3), device_type="cpu")
    assert calls == ["reference", "fast", "reference"]
    monkeypatch.setenv("MUSEFAST_BACKEND", "toy=fast")
    with pytest.raises(BackendUnavailableError, match="too big"):
        the_op(torch.zeros(30), device_type="cpu")


def test_unknown_names_are_errors_not_silent_auto_selection(monkeypatch):
    _toy_op()
    z, cb = torch.randn(4, 8), torch.randn(16, 8)
    for value, words in [("refrence", "no op has a backend named 'refrence'"),
                         ("attn=reference", "unknown op 'attn'"),
                         ("vq_nearest=sdpa", "op 'vq_nearest' has no backend 'sdpa'")]:
        monkeypatch.setenv("MUSEFAST_BACKEND", value)
        with pytest.raises(ValueError, match=words):
            ops.vq_nearest(z, cb)
    monkeypatch.delenv("MUSEFAST_BACKEND")
    with pytest.raises(ValueError, match="refrence"):
        with ops.use_backend("refrence"):
            pass


def test_use_backend_scopes_and_wins_over_env(monkeypatch):
    the_op, calls = _toy_op()
    monkeypatch.setenv("MUSEFAST_BACKEND", "toy=fast")
    with ops.use_backend("reference"):
        the_op(torch.zeros(3), device_type="cpu")
    the_op(torch.zeros(3), device_type="cpu")
    assert calls == ["reference", "fast"]


def test_env_var_drives_public_op(monkeypatch):
    z, cb = torch.randn(4, 8), torch.randn(16, 8)
    monkeypatch.setenv("MUSEFAST_BACKEND", "vq_nearest=cuda")
    with pytest.raises(BackendUnavailableError, match="needs cuda tensors"):
        ops.vq_nearest(z, cb)


def test_no_usable_backend_lists_every_reason():
    the_op = Op("lonely")
    the_op.register("a", lambda x: x, lambda x: ["reason a"])
    with pytest.raises(BackendUnavailableError, match="a: reason a"):
        the_op(torch.zeros(1), device_type="cpu")


def test_backends_table_reports_ok_and_reasons():
    table = ops.backends("cpu")
    assert table["vq_nearest"]["reference"] == "ok"
    assert table["vq_nearest"]["cpu"] == "ok"
    assert "cuda" in table["vq_nearest"]["cuda"]  # a reason, not "ok"


def test_debug_log_names_the_backend(caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="musefast.ops"):
        ops.vq_nearest(torch.randn(2, 4), torch.randn(3, 4), backend="reference")
    assert "vq_nearest -> backend reference" in caplog.text
