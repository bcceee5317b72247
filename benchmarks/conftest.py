"""Benchmark setup: same Triton-interpreter rule as tests/, and run metadata in the JSON."""
import os
import subprocess
import sys
from pathlib import Path

import torch  # noqa: E402

# The same rule as tests/conftest.py: the interpreter exactly when torch sees no CUDA device.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).parent))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    import datetime

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    output_json["musefast"] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
