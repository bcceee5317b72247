"""``DIR/manifest.jsonl``: one JSON line per finished row, the job's memory across runs.

A line is appended (write, flush, fsync) only after the row's image is durable, so a line
always points at a complete file; a crash can at most cut the *last* line short, which the next
run drops before appending. Resume = skip the ids already here; a row whose settings differ
from its line is a conflict (an error unless the job overwrites, which rewrites the manifest
without those ids, atomically).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from musefast.batch.durable import write_atomic

# A row's result is a function of these (its request's metadata, the model's fixed settings and
# weights); "format" says where its image lives.
IDENTITY = ("family", "prompt", "negative_prompt", "seed", "num_steps", "guidance_scale", "guidance_schedule",
            "guidance_interval", "temperature", "choice_temperature", "size", "cache", "strength", "sampler",
            "weights", "format")


class ManifestError(ValueError):
    pass


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = 0  # bytes up to the end of the last complete line
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.endswith(b"\n"):
                break  # cut short by a crash mid-append: dropped below
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ManifestError(f"{self.path} line {number} is not JSON; fix or remove that line") from None
            if record["id"] in self.records:
                raise ManifestError(f"{self.path} has id {record['id']!r} twice (line {number})")
            self.records[record["id"]] = record
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())

    def __contains__(self, row_id: str) -> bool:
        return row_id in self.records

    def conflicts(self, record: dict) -> list[str]:
        """Names of the identity fields where ``record`` differs from the line of its id (a line
        written before a field existed is compared on the fields it has)."""
        old = self.records.get(record["id"])
        if old is None:
            return []
        return [k for k in IDENTITY if k in old and old[k] != record.get(k)]

    def drop(self, ids: set[str]) -> None:
        """Forget ``ids`` (to regenerate them): the file is rewritten without their lines."""
        if not ids:
            return
        for row_id in ids:
            self.records.pop(row_id, None)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records.values())
        write_atomic(self.path, text.encode())

    def append(self, records: list[dict]) -> None:
        fresh = [r for r in records if r["id"] not in self.records]  # a retried task may report twice
        if not fresh:
            return
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh)
        with open(self.path, "ab") as f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        for r in fresh:
            self.records[r["id"]] = r
