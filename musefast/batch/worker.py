"""One pipeline generating rows: groups of equal settings -> PNG bytes + records.

Each row gets its own seed (``pipe(..., seed=[...])``), so its tokens do not depend on the
other rows of its batch; the record carries the sha256 of the tokens so that runs with other
batch sizes, worker counts or orders can be compared exactly.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from musefast.batch.job import Job, make_record, png_metadata
from musefast.batch.png import encode_png
from musefast.batch.rows import Row, RowError
from musefast.pipelines.images import format_output


@dataclass
class Done:
    record: dict  # the manifest line, less file / sha256 (the sink adds them)
    png: bytes


def group_key(record: dict) -> tuple:
    """Rows that can share a forward pass: same steps and guidance (negatives may differ)."""
    return record["num_steps"], record["guidance_scale"]


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()


class Worker:
    """Holds one pipeline. ``deterministic=True`` runs every row as a batch of one, so not even
    the floating-point blocking of a batched matrix product can change a token."""

    def __init__(self, pipe, job: Job, *, deterministic: bool = False, backend: str | None = None):
        self.pipe, self.job, self.deterministic, self.backend = pipe, job, deterministic, backend

    def generate(self, rows: list[Row]) -> list[Done | RowError]:
        """Rows of one settings group (callers group them; see ``group_key``)."""
        if self.deterministic and len(rows) > 1:
            return [out for row in rows for out in self.generate([row])]
        records = [make_record(r, self.job) for r in rows]
        try:
            tokens = self._tokens(records)
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the job
            if len(rows) > 1:  # find which rows fail, keep the others
                return [out for row in rows for out in self.generate([row])]
            return [RowError(rows[0].line, rows[0].id, f"{type(exc).__name__}: {exc}")]
        images = format_output(self.pipe.decode(tokens), "pil")
        out = []
        for record, row_tokens, image in zip(records, tokens, images):
            record["tokens_sha256"] = tokens_hash(row_tokens)
            out.append(Done(record, encode_png(image, png_metadata(record))))
        return out

    def _tokens(self, records: list[dict]) -> torch.Tensor:
        first = records[0]
        return self.pipe([r["prompt"] for r in records],
                         negative_prompt=[r["negative_prompt"] or "" for r in records],
                         seed=[r["seed"] for r in records], num_steps=first["num_steps"],
                         guidance_scale=first["guidance_scale"], output_type="tokens", backend=self.backend,
                         progress=False)
