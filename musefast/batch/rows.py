"""Rows of a batch job: read .txt / .jsonl / .csv / .parquet (or a Python list) into :class:`Row`.

A row is a ``prompt`` with optional ``id``, ``seed``, ``negative_prompt``, ``num_steps`` and
``guidance_scale``. The id defaults to the row's line number (.txt, .jsonl) or row number
(.csv, .parquet; 1-based, header excluded); the seed defaults to a hash of (global seed, id), so
a row's seed never depends on which other rows are in the file. Columns other than these are
ignored (datasets carry urls, licences, ...). A row with a bad value becomes a
:class:`RowError` — recorded in errors.jsonl by the runner — instead of stopping the job.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
FIELDS = ("id", "prompt", "seed", "negative_prompt", "num_steps", "guidance_scale")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")  # becomes a file name: no paths, no dot-files
SEED_BITS = 62  # seeds stay below 2**62 so the super-res stage's seed + 1 is a valid Philox key


@dataclass(frozen=True)
class Row:
    id: str
    prompt: str
    seed: int
    negative_prompt: str | None = None
    num_steps: int | None = None  # None: the job's (or the model's) default
    guidance_scale: float | None = None
    line: int = 0  # where it came from, for messages


@dataclass(frozen=True)
class RowError:
    line: int
    id: str | None
    error: str


def default_seed(row_id: str, global_seed: int) -> int:
    digest = hashlib.sha256(f"{global_seed}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - SEED_BITS)


def read_rows(source, *, global_seed: int = 0) -> list[Row | RowError]:
    """A path (one of FORMATS) or a list of prompts / dicts -> rows in input order."""
    if isinstance(source, (str, os.PathLike)):
        records = _read_path(Path(source))
    elif isinstance(source, (list, tuple)):
        records = ((i, r if isinstance(r, dict) else {"prompt": r}) for i, r in enumerate(source, 1))
    else:
        raise TypeError(f"prompts must be a path or a list of prompts/dicts, got {type(source).__name__}")
    return [_to_row(line, record, global_seed) for line, record in records]


def _read_path(path: Path) -> Iterator[tuple[int, dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            return [(i, {"prompt": line.strip()}) for i, line in enumerate(f, 1) if line.strip()]
    if suffix == ".jsonl":
        return list(_read_jsonl(path))
    if suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "prompt" not in reader.fieldnames:
                raise ValueError(f"{path}: a .csv needs a header with a 'prompt' column, got {reader.fieldnames}")
            # empty cells mean "not given", as a missing column does
            return [(i, {k: v for k, v in rec.items() if v not in ("", None)}) for i, rec in enumerate(reader, 1)]
    if suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"{path}: prompts must be one of {', '.join(FORMATS)}, got {suffix or 'no suffix'!r}")


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record = {"_error": f"not valid JSON: {exc}"}
            if not isinstance(record, dict):
                record = {"_error": f"a .jsonl line must be a JSON object, got {type(record).__name__}"}
            yield i, record


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path)
    if "prompt" not in table.column_names:
        raise ValueError(f"{path}: no 'prompt' column (columns: {table.column_names})")
    columns = [c for c in FIELDS if c in table.column_names]
    table = table.select(columns)
    return [(i, {k: v for k, v in rec.items() if v is not None}) for i, rec in enumerate(table.to_pylist(), 1)]


def _to_row(line: int, record: dict, global_seed: int) -> Row | RowError:
    row_id = str(record["id"]) if record.get("id") is not None else str(line)
    try:
        if "_error" in record:
            raise ValueError(record["_error"])
        if not _ID.match(row_id):
            raise ValueError(f"id {row_id!r} must be 1-200 letters, digits, '.', '_' or '-' (it names a file)")
        prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        negative = record.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"negative_prompt must be a string, got {negative!r}")
        seed = _int(record, "seed", 0, (1 << SEED_BITS) - 1)
        steps = _int(record, "num_steps", 1, 10_000)
        guidance = _float(record, "guidance_scale")
    except ValueError as exc:
        return RowError(line, row_id, str(exc))
    return Row(row_id, prompt, default_seed(row_id, global_seed) if seed is None else seed, negative, steps,
               guidance, line)


def _int(record: dict, name: str, low: int, high: int) -> int | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # csv/parquet may hold 12 as 12.0
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def _float(record: dict, name: str) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    try:
        out = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out
