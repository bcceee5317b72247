"""What a batch job is: the model's identity and defaults, and each row's full record.

A record is the manifest line of a row: its id, prompt, seed, every setting (resolved against
the job's and the model's defaults), the sampler, the model and a hash of its weights, the
musefast version and — once written — where its image is and the sha256 of the PNG.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from musefast.batch.png import METADATA_KEYS
from musefast.batch.rows import Row

SAMPLER_FIELDS = ("preset", "temperature", "choice_temperature", "guidance_schedule", "mask_schedule",
                  "super_res_steps")


@dataclass(frozen=True)
class Job:
    model: str
    weights: str  # sha256 over every component's state_dict
    sampler: dict = field(default_factory=dict)  # the model's decoding settings a row cannot change
    num_steps: int = 12  # defaults for rows that do not set them
    guidance_scale: float = 1.0
    negative_prompt: str | None = None
    format: str = "png"
    version: str = ""


def weights_hash(pipe) -> str:
    """sha256 of names, dtypes, shapes and bytes of every parameter and buffer of every component
    (a model renamed or moved keeps its hash; a retrained one does not)."""
    h = hashlib.sha256()
    for name, module in sorted(pipe._modules().items()):
        for key, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}.{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def make_job(pipe, model: str, *, num_steps=None, guidance_scale=None, negative_prompt=None, fmt="png") -> Job:
    from musefast import __version__
    from musefast.pipelines.muse import MusePipeline

    if not isinstance(pipe, MusePipeline):
        raise ValueError(f"musefast batch runs MusePipeline models; {model!r} is a {type(pipe).__name__}")
    s = pipe.settings
    return Job(model=str(model), weights=weights_hash(pipe),
               sampler={k: getattr(s, k) for k in SAMPLER_FIELDS},
               num_steps=s.num_steps if num_steps is None else num_steps,
               guidance_scale=float(s.guidance_scale if guidance_scale is None else guidance_scale),
               negative_prompt=negative_prompt, format=fmt, version=__version__)


def make_record(row: Row, job: Job) -> dict:
    """The manifest line of ``row`` before its image exists (file and sha256 come later)."""
    return {
        "id": row.id, "prompt": row.prompt,
        "negative_prompt": row.negative_prompt if row.negative_prompt is not None else job.negative_prompt,
        "seed": row.seed,
        "num_steps": row.num_steps if row.num_steps is not None else job.num_steps,
        "guidance_scale": row.guidance_scale if row.guidance_scale is not None else job.guidance_scale,
        "sampler": job.sampler, "model": job.model, "weights": job.weights, "musefast": job.version,
        "format": job.format,
    }


def png_metadata(record: dict) -> dict:
    """The PNG text chunks of a row (the same keys ``musefast generate`` writes), in METADATA_KEYS order."""
    values = {**record, "sampler": record["sampler"]["preset"], "musefast_version": record["musefast"]}
    return {k: values[k] for k in METADATA_KEYS}
