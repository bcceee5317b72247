"""Backend registry: ordering, reasons, explicit requests, MUSEFAST_BACKEND, backends()."""
import pytest
import torch

from musefast import ops
from musefast.ops.registry import BackendUnavailableError, Op


def _toy_op():
    calls = []
    the_op = Op("toy")
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
    monkeypatch.setenv("MUSEFAST_BACKEND", "other=fast,toy=reference")
    the_op(torch.zeros(3), device_type="cpu")
    assert calls == ["reference", "fast", "reference"]
    monkeypatch.setenv("MUSEFAST_BACKEND", "toy=fast")
    with pytest.raises(BackendUnavailableError, match="too big"):
        the_op(torch.zeros(30), device_type="cpu")


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
