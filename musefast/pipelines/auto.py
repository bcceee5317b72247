"""``musefast.load`` and ``musefast.generate``: one entry point for every model source.

The folder says which pipeline it holds (its ``model_index.json``, or a Meissonic transformer
config); that pipeline's ``from_pretrained`` reads the components and makes each one runnable
through :mod:`musefast.pipelines.loading`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from musefast.compat.meissonic import is_meissonic_pipeline
from musefast.cpu import int8
from musefast.models.serialization import read_json
from musefast.pipelines.amused import AMUSED_CLASSES, AmusedPipeline
from musefast.pipelines.meissonic import MeissonicPipeline
from musefast.pipelines.muse import PIPELINE_INDEX, MusePipeline
from musefast.pipelines.shared import HUB_ID

_HUB_ID = HUB_ID
PIPELINE_CLASSES = {"MusePipeline": MusePipeline, **{name: AmusedPipeline for name in AMUSED_CLASSES},
                    "MeissonicPipeline": MeissonicPipeline}


def load(name_or_path: str | os.PathLike = "demo", *, device: str | torch.device | None = None,
         dtype: torch.dtype | str | None = "auto", torch_dtype: torch.dtype | None = None,
         quantize: str | None = None):
    """Load a pipeline.

    ``name_or_path``: ``"demo"`` (the model embedded in the package); a local folder in
    musefast format (``model_index.json`` written by ``save_pretrained``) or in diffusers'
    aMUSEd layout (an :class:`AmusedPipeline`) or Meissonic's (a :class:`MeissonicPipeline`,
    recognised by its transformer config's keys); or a hub id (``owner/name``), downloaded with
    huggingface_hub — only when you name one and no such local folder exists. A device that is
    not available here is refused before anything loads.

    ``dtype``: of the transformer(s) and text encoder (the VQ's weights stay float32). ``"auto"``
    (default): bfloat16 on a CPU that computes it natively (AVX512-BF16 or AMX; the VQ decoder of
    an aMUSEd or Meissonic pipeline then computes in bf16 too), else the weights' own dtype; a compat-sampler call still runs in the weights' dtype (see
    :meth:`AmusedPipeline.from_pretrained`). ``None``: the weights' dtype. ``torch_dtype`` is
    diffusers' name for ``dtype``. On a CPU every model runs through musefast's CPU engine
    (packed oneDNN linears; ``musefast doctor``).

    ``quantize``: ``"int8"`` runs the transformer(s)' linears in int8 on a CPU with VNNI
    (opt-in: close to the float logits, not equal; see :mod:`musefast.cpu.int8`); None: off.
    """
    from musefast.pipelines.options import check_device, diffusers_dtype

    dtype = diffusers_dtype(dtype, torch_dtype)
    check_device(device)
    int8.check(quantize, device)
    if str(name_or_path) == "demo":
        from musefast.pipelines import demo

        return demo.load_demo(device=device, dtype=dtype, quantize=quantize)
    folder = _resolve(name_or_path)
    index = _read_index(folder)
    cls_name = index.get("_class") or index.get("_class_name")
    if is_meissonic_pipeline(folder):  # the peer's class names are generic: its transformer config's keys tell
        cls_name = "MeissonicPipeline"
    if cls_name not in PIPELINE_CLASSES:
        raise ValueError(f"{folder / PIPELINE_INDEX}: unsupported pipeline class {cls_name!r}; "
                         f"this version loads {sorted(PIPELINE_CLASSES)}")
    return PIPELINE_CLASSES[cls_name].from_pretrained(folder, device=device, dtype=dtype, quantize=quantize)


def _resolve(name_or_path) -> Path:
    """A local folder; a hub download only for a string shaped exactly ``owner/name`` (no ./, ../,
    ~ or absolute path) when no such folder exists here."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; musefast.load expects a pipeline folder")
    text = str(name_or_path)
    if isinstance(name_or_path, str) and _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _download(text, path)
    raise FileNotFoundError(f"model folder not found: {path.absolute()}")


def _download(repo_id: str, local: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated: one line for all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{repo_id!r} is not a local folder ({local.absolute()} does not exist) and could "
                                f"not be fetched from the Hugging Face hub: {first}") from None


def _read_index(folder: Path) -> dict:
    index_file = folder / PIPELINE_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file} not found: {folder} is not a pipeline folder")
    return read_json(index_file)



def generate(prompt, *, model="demo", device=None, dtype=None, **kw):
    """Text to images in one call: ``load(model)`` then ``pipe(prompt, **kw)``.

    ``model`` may also be an already loaded pipeline. Returns a list of PIL images unless
    ``output_type`` says otherwise.
    """
    pipe = model if isinstance(model, (MusePipeline, AmusedPipeline)) else load(model, device=device, dtype=dtype)
    return pipe(prompt, **kw)
