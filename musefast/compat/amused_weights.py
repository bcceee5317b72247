"""Reading diffusers model folders (aMUSEd's ``transformer/`` and ``vqvae/``) into musefast models.

A diffusers model folder holds ``config.json`` (with ``"_class_name"``) and
``diffusion_pytorch_model[.<variant>].safetensors`` (or a sharded ``...safetensors.index.json``).
Conversion is strict: each musefast parameter names the diffusers key(s) it is made of; a key
that is missing from the file, a key of the file that nothing uses, or a shape that does not
fit is an error listing every offending key and naming the file. Nothing here downloads.
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from musefast.compat._convert import check_dtype

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"


def is_diffusers_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder/config.json`` is a diffusers model config (has ``_class_name``)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "_class_name" in data and "_class" not in data


def read_diffusers_config(folder: str | os.PathLike, expected_class: str) -> dict:
    """The config of a diffusers model folder, checked to be of ``expected_class``."""
    path = Path(folder) / CONFIG_NAME
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the {expected_class} config of a diffusers folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if name != expected_class:
        raise ValueError(f"{path}: expected a diffusers {expected_class} config, got _class_name={name!r}")
    return data


def weights_files(folder: str | os.PathLike, variant: str | None = None, stem: str = WEIGHTS_STEM) -> list[Path]:
    """The safetensors file(s) of a diffusers folder.

    ``variant=None`` takes the full-precision file, else the single variant present (e.g.
    only ``.fp16`` was downloaded); ``variant="fp16"`` insists on that variant. Sharded
    checkpoints (``<stem>[.<variant>].safetensors.index.json``) give all their shards.
    """
    folder = Path(folder)
    names = [f"{stem}.{variant}.safetensors"] if variant else [f"{stem}.safetensors"]
    if variant is None:
        names += sorted(p.name for p in folder.glob(f"{stem}.*.safetensors") if p.name.count(".") == 2)
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) that are missing: {missing}")
            return [folder / s for s in shards]
    present = sorted(p.name for p in folder.glob("*.safetensors*")) if folder.is_dir() else []
    wanted = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors (or a variant)"
    hint = " (.bin files are not read: convert them to safetensors)" if folder.is_dir() and any(folder.glob("*.bin")) else ""
    raise FileNotFoundError(f"no weights {wanted} in {folder}; safetensors files there: {present or 'none'}{hint}")


def load_weights(files: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of safetensors ``files``, floating ones cast to ``dtype`` as each is read.

    Each tensor is read through its own short-lived ``safe_open``: the file's memory map (whose
    touched pages count as resident) never holds more than one tensor, and a cast never needs
    the whole file in its stored dtype at once: the peak stays near the result's size."""
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                keys = list(handle.keys())
            for key in keys:
                with safe_open(str(f), framework="pt") as handle:
                    tensor = handle.get_tensor(key)
                state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except Exception as err:  # a truncated or foreign file: name it
            raise ValueError(f"cannot read weights file {f}: {err}") from None
    return state


def stored_dtype_and_count(files: list[Path]) -> tuple[torch.dtype, int]:
    """The floating dtype the files store (float32 if none) and their element count, from the
    headers only."""
    floats = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    dtype, count = None, 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                info = handle.get_slice(key)
                dtype = dtype or floats.get(info.get_dtype())
                count += math.prod(info.get_shape())
    return dtype or torch.float32, count


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}): " + ", ".join(items[:limit]) + more


def convert_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    source_keys: Callable[[str], list[str]],
    *,
    source: str,
    flatten_1x1: bool = True,
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """Build ``module``'s state dict from a peer's ``state``.

    ``source_keys(name)`` gives the peer key(s) of each of ``module``'s parameters; several are
    concatenated along dim 0 (fused projections). With ``flatten_1x1``, a (out, in, 1, 1) conv
    weight fills a (out, in) Linear weight. Raises ValueError naming ``source`` and listing
    missing, unused and mis-shaped peer keys. ``consume`` (``state`` must then be a dict the
    caller gives up): each peer tensor is deleted from it once used.
    """
    expected = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    # consume: a peer tensor is dropped from ``state`` once its last user is built, so the
    # concatenated (fused) parameters never coexist with all their parts (the load's peak)
    remaining = Counter(k for name in expected for k in source_keys(name)) if consume else None
    missing: list[str] = []
    mismatched: list[str] = []
    for name, target in expected.items():
        keys = source_keys(name)
        used.update(k for k in keys if k in state)  # the rest of an incomplete group is not "unexpected"
        absent = [k for k in keys if k not in state]
        if absent:
            missing += absent
            continue
        parts = [state[k] for k in keys]
        tensor = parts[0] if len(parts) == 1 else _cat(parts)
        if tensor is not None and flatten_1x1 and target.dim() == 2 and tensor.dim() == 4 \
                and tuple(tensor.shape[2:]) == (1, 1):
            tensor = tensor.reshape(tensor.shape[:2])
        if tensor is None or tuple(tensor.shape) != tuple(target.shape):
            shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in keys)
            mismatched.append(f"{shapes} -> {name} expects {tuple(target.shape)}")
            continue
        out[name] = tensor
        if consume:
            remaining.subtract(keys)
            for k in keys:
                if remaining[k] == 0:
                    del state[k]
    unused = sorted(set(state) - used)
    if missing or unused or mismatched:
        lines = [f"weights in {source} do not fit {type(module).__name__} "
                 f"(built from the folder's config.json):"]
        for title, items in (("missing", sorted(set(missing))), ("unexpected", unused),
                             ("shape mismatch", mismatched)):
            if items:
                lines.append(_listing(title, items))
        raise ValueError("\n".join(lines))
    return out


def _cat(parts: list[torch.Tensor]) -> torch.Tensor | None:
    if len({p.shape[1:] for p in parts}) != 1:
        return None
    return torch.cat(parts, dim=0)


def load_converted(build: Callable[[], nn.Module], folder: str | os.PathLike,
                   source_keys: Callable[[str], list[str]], *, variant: str | None = None, device=None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """``build()`` a module (on the meta device: no time spent on a random init) and fill it
    with a diffusers folder's weights, strictly. It keeps the file's dtype unless ``dtype`` is
    given; returned plain, in eval mode on ``device`` (default CPU): how it runs is decided by
    :func:`musefast.pipelines.loading.runnable`."""
    check_dtype(dtype)
    files = weights_files(folder, variant)
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
    # cast as read, so the stored dtype is never held whole (fp32 files run in bf16: half the peak)
    return fill_converted(build, load_weights(files, dtype), source_keys, source=source, device=device, dtype=dtype,
                          consume=True)


def fill_converted(build: Callable[[], nn.Module], state: Mapping[str, torch.Tensor],
                   source_keys: Callable[[str], list[str]], *, source: str, device=None,
                   dtype: torch.dtype | None = None, consume: bool = False) -> nn.Module:
    """``build()`` a module on the meta device and fill it from a peer's ``state`` (strictly,
    see :func:`convert_strict`); returned plain, in eval mode on ``device`` in ``dtype`` (default:
    as ``state``). The one conversion path for files and for a peer's in-memory modules."""
    with torch.device("meta"):
        module = build()
    converted = convert_strict(module, state, source_keys, source=source, consume=consume)  # consume: empties state
    module.load_state_dict(converted, strict=True, assign=True)
    del converted  # the module holds the only references: .to() and packing free as they go
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    return module.eval()
