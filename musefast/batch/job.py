"""What a batch job is: the model's identity and family, and each row's full record.

A record is the manifest line of a row: its id, the row's request resolved against the job's
and the model family's defaults (``Request.to_metadata``: every setting that determines the
image), the family's fixed decoding settings, a hash of the weights, the musefast version and —
once written — where its image is and the sha256 of the PNG.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from musefast.batch.png import METADATA_KEYS
from musefast.batch.rows import Row
from musefast.generation import Request, adapter_for
from musefast.generation.adapters import Adapter


@dataclass(frozen=True)
class Job:
    model: str
    weights: str  # sha256 over every component's state_dict
    family: str = "muse"
    sampler: dict = field(default_factory=dict)  # the model's decoding settings a row cannot change
    num_steps: int | None = None  # for rows that do not set them (None: the family's default)
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    size: tuple | None = None  # (height, width) in pixels (None: the model's)
    format: str = "png"
    version: str = ""


def weights_hash(pipe) -> str:
    """sha256 of names, dtypes, shapes and bytes of every parameter and buffer of every component
    (a model renamed or moved keeps its hash; a retrained one does not)."""
    h = hashlib.sha256()
    for name, module in sorted(adapter_for(pipe).components().items()):
        for key, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fixed_settings(adapter: Adapter) -> dict:
    """The decoding settings that come with the model, not with a row."""
    pipe = adapter.pipe
    if adapter.family == "muse":
        s = pipe.settings
        return {"preset": s.preset, "mask_schedule": s.mask_schedule, "super_res_steps": s.super_res_steps}
    return {"preset": "amused", "mask_schedule": pipe.masking_schedule}


def make_job(pipe, model: str, *, num_steps=None, guidance_scale=None, negative_prompt=None, size=None,
             fmt="png") -> Job:
    from musefast import __version__

    adapter = adapter_for(pipe)
    if size is not None:  # a size the model cannot make fails the job now, not every row
        size = adapter.resolve(Request(prompt="-", size=size)).size
    return Job(model=str(model), weights=weights_hash(pipe), family=adapter.family, sampler=fixed_settings(adapter),
               num_steps=num_steps, guidance_scale=None if guidance_scale is None else float(guidance_scale),
               negative_prompt=negative_prompt, size=size,
               format=fmt, version=__version__)


def make_request(row: Row, job: Job) -> Request:
    """The row's request, the job's values filling what the row leaves unset."""
    return Request(prompt=row.prompt,
                   negative_prompt=row.negative_prompt if row.negative_prompt is not None else job.negative_prompt,
                   seed=row.seed, num_steps=row.num_steps if row.num_steps is not None else job.num_steps,
                   guidance_scale=row.guidance_scale if row.guidance_scale is not None else job.guidance_scale,
                   size=job.size, model=job.model)


def make_record(request: Request, row_id: str, job: Job) -> dict:
    """The manifest line of a resolved request before its image exists (file and sha256 come later)."""
    meta = request.to_metadata()
    meta.pop("sampler")  # the engine's step; the record's sampler holds the model's fixed settings
    return {"id": row_id, **meta, "sampler": job.sampler, "weights": job.weights, "musefast": job.version,
            "format": job.format}


def png_metadata(record: dict) -> dict:
    """The PNG text chunks of a row (the same keys ``musefast generate`` writes), in METADATA_KEYS order."""
    values = {**record, "sampler": record["sampler"]["preset"], "musefast_version": record["musefast"]}
    return {k: values[k] for k in METADATA_KEYS if k in values}
