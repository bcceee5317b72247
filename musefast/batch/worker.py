"""One pipeline generating rows on the generation engine: rows -> PNG bytes + records.

Every row is a request of its own (its own seed, steps, guidance and negative prompt), and rows
with different settings share the engine's forwards; a row's tokens do not depend on the other
rows (the engine's batch invariance). Each image is decoded alone, so its bytes do not either.
The record carries the sha256 of the tokens so that runs with other batch sizes, worker counts
or orders can be compared exactly.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch

from musefast.batch.job import Job, make_record, make_request, png_metadata
from musefast.batch.png import encode_png
from musefast.batch.rows import Row, RowError
from musefast.generation import Engine, State, adapter_for
from musefast.pipelines.images import format_output


@dataclass
class Done:
    record: dict  # the manifest line, less file / sha256 (the sink adds them)
    png: bytes


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()


class Worker:
    """Holds one pipeline and runs rows on an engine of ``max_batch`` requests in flight.
    ``deterministic=True`` runs one request at a time (max_batch 1)."""

    def __init__(self, pipe, job: Job, *, deterministic: bool = False, backend: str | None = None,
                 max_batch: int = 8):
        self.adapter, self.job, self.backend = adapter_for(pipe), job, backend
        self.max_batch = 1 if deterministic else max_batch

    def record(self, row: Row) -> dict:
        """The row's manifest line (ValueError/TypeError for a row the model cannot run)."""
        return make_record(self.adapter.resolve(make_request(row, self.job)), row.id, self.job)

    def generate(self, rows: list[Row]) -> list[Done | RowError]:
        return [out for outputs in self.stream(rows) for out in outputs]

    def stream(self, rows: list[Row]) -> Iterator[list[Done | RowError]]:
        """Yields the outputs of the rows that finished at each engine step (and row errors)."""
        engine = Engine(self.adapter, max_batch=self.max_batch, max_queue=max(1, len(rows)), backend=self.backend,
                        model_name=self.job.model)
        running, errors = [], []
        for row in rows:
            try:
                running.append((row, engine.submit(make_request(row, self.job))))
            except (ValueError, TypeError) as exc:
                errors.append(RowError(row.line, row.id, f"{type(exc).__name__}: {exc}"))
        if errors:
            yield errors
        while running:
            engine.step()
            finished = [(row, h) for row, h in running if h.done()]
            if finished:
                running = [(row, h) for row, h in running if not h.done()]
                yield [self._output(row, h) for row, h in finished]

    def _output(self, row: Row, handle) -> Done | RowError:
        if handle.state is not State.DONE:
            return RowError(row.line, row.id, f"{type(handle.error).__name__}: {handle.error}")
        record = make_record(handle.request, row.id, self.job)
        tokens = handle.result()
        record["tokens_sha256"] = tokens_hash(tokens)
        image = format_output(self.adapter.decode(tokens[None], handle.stage.kind), "pil")[0]
        return Done(record, encode_png(image, png_metadata(record)))
