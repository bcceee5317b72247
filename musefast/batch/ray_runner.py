"""The same job on Ray Data: a pool of actors, each holding one pipeline.

The driver plans (reads the rows, skips the manifest's, cuts them into batches) and hands Ray one
item per batch; an actor generates it on its engine and, for PNG output, writes the images itself (durably;
on a multi-node cluster DIR must be a shared filesystem) and returns their records; for
webdataset it returns the PNG bytes and the driver writes the shards. Only the driver appends
to the manifest, so a line is written once per id. Ray restarts a killed actor and retries its
batch (Ray Data's actor-pool default); a retried row rewrites the same image (same row, same
bytes) and the manifest ignores an id it already holds.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

from musefast.batch.job import Job
from musefast.batch.rows import Row


class _GenerateActor:
    def __init__(self, job: Job, out_dir: str, model: str, threads: int, deterministic: bool, device, dtype,
                 backend, write_images: bool, max_batch: int):
        import torch

        from musefast import load
        from musefast.batch.job import weights_hash
        from musefast.batch.sinks import ImageSink
        from musefast.batch.worker import Worker

        torch.set_num_threads(threads)
        if backend:  # as the CLI's --backend: every op, the models' attention included
            os.environ["MUSEFAST_BACKEND"] = backend
        pipe = load(model, device=device, dtype=dtype)
        if weights_hash(pipe) != job.weights:  # a node with another copy of the model would mix results
            raise RuntimeError(f"model {model!r} on {os.uname().nodename} has other weights than on the driver")
        self.worker = Worker(pipe, job, deterministic=deterministic, max_batch=max_batch)
        self.sink = ImageSink(Path(out_dir)) if write_images else None

    def __call__(self, item: dict) -> dict:
        outputs = self.worker.generate(pickle.loads(item["rows"]))
        if self.sink is not None:  # write here: only small records travel back to the driver
            outputs = [r for out in outputs for r in (self.sink.put(out) if hasattr(out, "png") else [out])]
        return {"outputs": pickle.dumps(outputs)}


def run_on_ray(batches: list[list[Row]], job: Job, out_dir: Path, *, model: str, address: str | None,
               workers: int | None, cpus_per_worker: int, deterministic: bool, device, dtype, backend,
               write_images: bool):
    """Yields each batch's outputs (records, Done or RowError) as the actors finish them."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install -e \".[distributed]\"") from None
    if not batches:  # nothing left to do: no cluster to start
        return
    backend = backend or os.environ.get("MUSEFAST_BACKEND")  # the CLI passes --backend this way
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    # musefast's bar is the one progress display; Ray Data's own bars and INFO lines would interleave
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 and (device is None or str(device).startswith("cuda"))
    if workers is None:  # one per GPU, else one per cpus_per_worker cores
        workers = gpus if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_worker)
    workers = min(workers, len(batches))
    items = ray.data.from_items([{"rows": pickle.dumps(b)} for b in batches], override_num_blocks=len(batches))
    ds = items.map(
        _GenerateActor,
        fn_constructor_kwargs=dict(job=job, out_dir=str(out_dir), model=model, threads=cpus_per_worker,
                                   deterministic=deterministic, device=device, dtype=dtype, backend=backend,
                                   write_images=write_images, max_batch=max(len(b) for b in batches)),
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=0 if use_gpu else cpus_per_worker, num_gpus=1 if use_gpu else 0,
    )
    for row in ds.iter_rows():
        yield pickle.loads(row["outputs"])
