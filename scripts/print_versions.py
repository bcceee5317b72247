"""Print the versions of the packages whose releases move musefast's behaviour (CI logs them so a
red run on a fresh machine says what moved). Reads installed metadata only: nothing is imported,
so it is quick and cannot fail on a broken install.

    python scripts/print_versions.py [LABEL]
"""
from __future__ import annotations

import importlib.metadata
import platform
import sys

PACKAGES = ("torch", "triton", "numpy", "transformers", "diffusers", "tokenizers", "huggingface-hub", "kernels",
            "ray", "openvino", "musefast")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def main(argv: list[str]) -> int:
    label = f" ({' '.join(argv)})" if argv else ""
    print(f"== versions{label}: python {platform.python_version()} {sys.executable}")
    print("   " + "  ".join(f"{name} {version}" for name, version in versions().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
