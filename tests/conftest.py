"""Test setup shared by every suite.

Triton must see TRITON_INTERPRET=1 *before* it is first imported for its kernels to run on
CPU tensors, so this is set here, at collection, whenever torch sees no CUDA device. On a GPU
machine the triton backend runs on CUDA tensors instead (tests/backends.py says which device
each backend's tests use).

GPU tests (marked ``gpu``) are skipped without CUDA. Each one counts the comparisons it made
through the ``comparisons`` fixture and fails when it made none: a GPU test must never be green
because everything in it was skipped.
"""
import contextlib
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

_COUNTER = pytest.StashKey()


class Comparisons:
    """How many results a test compared with the reference (or with an exact expectation)."""

    def __init__(self):
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n


@pytest.fixture
def comparisons(request) -> Comparisons:
    counter = Comparisons()
    request.node.stash[_COUNTER] = counter
    return counter


def pytest_sessionstart(session):
    """Compile musefast._C (if this machine has not yet) before the first test, where its progress
    lines reach the terminal: inside a test pytest captures them, and the first test to use an op
    would sit silent for minutes. Almost every run needs the kernels anyway."""
    from musefast import _build

    if not _build.needs_first_build():
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        _build.build_now()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield  # a failure or skip inside the test propagates from here unchanged
    if item.get_closest_marker("gpu") is not None:
        counter = item.stash.get(_COUNTER, None)
        if counter is None or counter.count == 0:
            pytest.fail("this gpu test compared nothing (use the `comparisons` fixture and count each check)")
    return result


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
