"""``batch_generate``: read rows, skip those in the manifest, generate the rest on the generation
engine (in this process, or on Ray), write images durably, then their manifest lines."""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from musefast.batch.job import make_job
from musefast.batch.manifest import Manifest
from musefast.batch.rows import Row, RowError, read_rows
from musefast.batch.sinks import FORMATS, make_sink
from musefast.batch.worker import Done, Worker

DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 32}


def batch_generate(prompts_or_path, out_dir, *, model="demo", batch_size: int | None = None, seed: int = 0,
                   num_steps: int | None = None, guidance_scale: float | None = None,
                   negative_prompt: str | None = None, size=None, format: str = "png", shard_size: int = 1000,
                   overwrite: bool = False, deterministic: bool = False, device=None, dtype=None,
                   backend: str | None = None, ray: bool = False, ray_address: str | None = None,
                   workers: int | None = None, cpus_per_worker: int = 2, progress: bool = True) -> dict:
    """Generate one image per row of ``prompts_or_path`` into ``out_dir`` (one manifest line per durably written PNG; resumable).

    ``model``: a name or folder as for ``musefast.load``, or a loaded pipeline (in-process
    only). ``prompts_or_path``: a .txt/.jsonl/.csv/.parquet path or a list of prompts (or dicts with
    ``prompt`` and optional ``id``, ``seed``, ``negative_prompt``, ``num_steps``,
    ``guidance_scale``). ``size``: (height, width) in pixels, or one int, for every row (None: the
    model's; the Muse family has one size). Rows already in ``out_dir/manifest.jsonl`` are skipped; a row whose
    settings differ from its manifest line raises ValueError unless ``overwrite``. ``seed`` is
    the global seed from which rows without one get theirs. ``ray``/``ray_address`` run the job
    on Ray Data with ``workers`` actors, each holding one pipeline.

    Returns a summary: rows done / skipped / failed, seconds, images per second.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if workers is not None and not (ray or ray_address):
        raise ValueError("workers applies to Ray runs: add ray=True (--ray) or ray_address (--ray-address)")
    if format == "webdataset" and overwrite:
        raise ValueError("--overwrite cannot replace rows inside existing webdataset shards; use a new folder")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file, not a folder: name a folder for images/ and manifest.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _exclusive(out):
        from musefast import load

        rows = read_rows(prompts_or_path, global_seed=seed)  # before the model: bad files fail fast
        if isinstance(model, (str, os.PathLike)):
            pipe = load(model, device=device, dtype=dtype)
        elif ray or ray_address:
            raise ValueError("with Ray, model must be a name or folder (each actor loads its own pipeline)")
        else:
            pipe, model = model, type(model).__name__
        job = make_job(pipe, model, num_steps=num_steps, guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt, size=size, fmt=format)
        manifest = Manifest(out / "manifest.jsonl")
        size = batch_size or DEFAULT_BATCH_SIZE.get(pipe.device.type, 8)
        worker = Worker(pipe, job, deterministic=deterministic, backend=backend, max_batch=size)
        pending, errors, skipped = _plan(rows, worker, manifest, overwrite=overwrite)
        errors_file = out / "errors.jsonl"
        errors_file.write_text("")  # describes the latest run only
        _log_errors(errors_file, errors)
        sink = make_sink(format, out, shard_size)
        sink.prepare({r["file"] for r in manifest.records.values()})
        if ray or ray_address:
            from musefast.batch.ray_runner import run_on_ray

            batches = [pending[i:i + size] for i in range(0, len(pending), size)]
            results = run_on_ray(batches, job, out, model=model, address=ray_address, workers=workers,
                                 cpus_per_worker=cpus_per_worker, deterministic=deterministic, device=device,
                                 dtype=dtype, backend=backend, write_images=format == "png")
        else:  # one engine for every row: a finished row's place goes to the next at once
            results = worker.stream(pending)
        generating = time.perf_counter()
        done, failed = _consume(results, sink, manifest, errors_file, len(pending), progress)
    end = time.perf_counter()
    seconds = end - start
    # the rate of the generation itself (model loading and planning are in the wall time)
    rate = done / (end - generating) if done else 0.0
    summary = {"done": done, "skipped": skipped, "failed": failed + len(errors), "seconds": round(seconds, 3),
               "images_per_s": round(rate, 3),
               "manifest": str(out / "manifest.jsonl")}
    if progress:
        print(f"musefast batch: {done} done, {skipped} skipped, {summary['failed']} failed in {seconds:.1f} s "
              f"({rate:.2f} images/s while generating) -> {summary['manifest']}", file=sys.stderr)
    return summary


@contextmanager
def _exclusive(out: Path):
    """Two jobs appending to one manifest would break exactly-once: one job per folder."""
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another musefast batch job is running in {out}") from None
        yield


def _plan(rows: list[Row | RowError], worker: Worker, manifest: Manifest, *, overwrite: bool):
    """-> (rows to generate, row errors, number of rows skipped as done)."""
    first_line: dict[str, int] = {}
    for r in rows:
        if r.id is not None and r.id in first_line:
            raise ValueError(f"id {r.id!r} appears twice in the prompts (rows {first_line[r.id]} and {r.line}); "
                             "ids must be unique")
        if r.id is not None:
            first_line[r.id] = r.line
    errors = [r for r in rows if isinstance(r, RowError)]
    good = [r for r in rows if isinstance(r, Row)]
    if worker.job.format == "webdataset":
        # webdataset splits a member name at its first dot into key and extension
        errors += [RowError(r.line, r.id, "an id with '.' cannot be a webdataset key") for r in good if "." in r.id]
        good = [r for r in good if "." not in r.id]
    conflicts, runnable = {}, []
    for r in good:
        try:
            record = worker.record(r)
        except (ValueError, TypeError) as exc:  # a value the model cannot run: that row fails alone
            errors.append(RowError(r.line, r.id, f"{type(exc).__name__}: {exc}"))
            continue
        runnable.append(r)
        fields = manifest.conflicts(record)
        if fields:
            conflicts[r.id] = fields
    good = runnable
    if conflicts and not overwrite:
        shown = "; ".join(f"{k}: {', '.join(v)}" for k, v in list(conflicts.items())[:3])
        raise ValueError(f"{len(conflicts)} row(s) differ from their manifest line ({shown}"
                         f"{'; ...' if len(conflicts) > 3 else ''}); pass --overwrite to regenerate them")
    manifest.drop(set(conflicts))
    pending = [r for r in good if r.id not in manifest]
    return pending, errors, len(good) - len(pending)


def _consume(results, sink, manifest: Manifest, errors_file: Path, total: int, progress: bool):
    from tqdm.auto import tqdm

    done = failed = 0
    with tqdm(total=total, unit="img", desc="musefast batch", disable=not progress, smoothing=0.05) as bar:
        for outputs in results:
            ready, bad = [], []
            for item in outputs:
                if isinstance(item, RowError):
                    bad.append(item)
                elif isinstance(item, Done):
                    ready += sink.put(item)
                else:  # a record whose image a Ray actor already wrote durably
                    ready.append(item)
            manifest.append(ready)
            _log_errors(errors_file, bad)
            done, failed = done + len(ready), failed + len(bad)
            bar.update(len(outputs))
        last = sink.close()
        manifest.append(last)
        done += len(last)
    return done, failed


def _log_errors(path: Path, errors: list[RowError]) -> None:
    if not errors:
        return
    with open(path, "a", encoding="utf-8") as f:
        for e in errors:
            f.write(json.dumps({"line": e.line, "id": e.id, "error": e.error}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
