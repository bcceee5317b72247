"""Writes that survive a crash at any instant: a file is either absent or complete.

POSIX recipe: write a temporary name in the same folder, fsync it, rename it over the final
name (atomic), fsync the folder (so the rename itself is on disk).
"""
from __future__ import annotations

import os
from pathlib import Path

TMP_PREFIX = ".tmp-"  # temporaries a crash leaves behind carry this prefix; a new run removes them


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    # the pid keeps two writers of one id (a retried Ray task next to a dying one) apart
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_temporaries(folder: Path) -> int:
    """Delete what crashed writers left in ``folder``; -> how many."""
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
