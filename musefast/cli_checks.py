"""Checks of command-line values that run before any model loads.

Each raises :class:`UsageError` with one line naming the value and the fix; ``musefast.cli``
turns it into ``musefast <command>: error: ...`` and exit code 2. Shared by every command that
writes images (generate, inpaint, outpaint, edit, and batch runs).
"""
from __future__ import annotations

import math
import os
import tempfile
from argparse import ArgumentTypeError
from pathlib import Path

# Formats PIL writes without extra plugins; only PNG carries the generation parameters.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_SEED = 2**63 - 1


class UsageError(ValueError):
    """A command-line value that cannot work: exit code 2, no traceback."""


def output_path(value: str) -> Path:
    """``-o``: a file path with an image suffix whose folder exists or can be created, and is writable.

    The folder is created here (before the model loads) so that a run never fails after
    generating because of where it was asked to write.
    """
    path = Path(value).expanduser()
    if value.endswith(("/", os.sep)) or path.is_dir():
        raise UsageError(f"-o {value} is a folder; give a file name, e.g. -o {path / 'out.png'}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UsageError(f"-o {value}: unsupported image type {path.suffix or '(no suffix)'!r}; "
                         f"use one of {', '.join(IMAGE_SUFFIXES)} (e.g. -o {path.with_suffix('.png')})")
    folder = path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"-o {value}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"-o {value}: cannot write in {folder} ({exc.strerror or exc}); choose another folder") from None
    return path


def numbered_paths(path: Path, count: int) -> list[Path]:
    """Where ``count`` images for ``-o path`` go: the path itself, or ``stem_i.suffix``."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def device(value: str | None) -> str | None:
    """``--device``: a torch device that exists on this machine."""
    if value is None:
        return None
    from musefast.pipelines.options import device_problem

    problem = device_problem(value)
    if problem is not None:
        raise UsageError(f"--device {value}: {problem}")
    return value


# -- argparse ``type=`` functions: argparse prints their message as a usage error (exit 2) --

def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def seed(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= MAX_SEED:
        raise ArgumentTypeError(f"must be in [0, 2**63 - 1], got {value}")
    return value


def guidance(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value < 0:
        raise ArgumentTypeError(f"must be a finite number >= 0 (<= 1: no guidance), got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value

