"""conftest's rule for GPU tests: a gpu-marked test that compared nothing fails.

Checked in a child pytest whose conftest is this suite's, with torch.cuda.is_available()
forced to True so that the gpu tests are not skipped (they touch no GPU).
"""
import subprocess
import sys
from pathlib import Path

CHILD_TESTS = '''
import pytest

@pytest.mark.gpu
def test_compares_nothing():
    pass

@pytest.mark.gpu
def test_counts(comparisons):
    comparisons.add()

@pytest.mark.gpu
def test_skips():
    pytest.skip("flash-attn is not installed")

def test_cpu_test_needs_no_count():
    pass
'''


def test_gpu_test_with_zero_comparisons_fails(tmp_path):
    conftest = (Path(__file__).parent / "conftest.py").read_text()
    (tmp_path / "conftest.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n" + conftest)
    (tmp_path / "test_child.py").write_text(CHILD_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert "FAILED test_child.py::test_compares_nothing" in out and "compared nothing" in out, out[-3000:]
    assert "PASSED test_child.py::test_counts" in out
    assert "SKIPPED" in out and "PASSED test_child.py::test_cpu_test_needs_no_count" in out
    assert "1 failed, 2 passed, 1 skipped" in out
