"""The training loss log: one JSON object per line (``train_log.jsonl``)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class LossLog:
    """Append-only JSON-lines log: ``{"stage", "step", "elapsed_s", <metrics>}`` per row.

    Args:
        path: the file (its folder is created; an existing file is replaced), or None to keep
            rows in memory only (``rows``).
        every: write one row per ``every`` steps of a stage (step 0 and the last step a stage
            reports with ``force=True`` are always written).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path = None if path is None else Path(path)
        self.every = every
        self.rows: list[dict] = []
        self._start = time.perf_counter()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w")

    def write(self, stage: str, step: int, *, force: bool = False, **metrics) -> None:
        if step % self.every and not force:
            return
        row = {"stage": stage, "step": int(step), "elapsed_s": round(time.perf_counter() - self._start, 3)}
        row.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "LossLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
