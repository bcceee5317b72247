"""The musefast component format: one folder per component, ``config.json`` + ``model.safetensors``.

Any ``nn.Module`` whose constructor takes one dataclass config can be a component::

    @register_component
    class VQGAN(nn.Module):
        config_class = VQGANConfig
        def __init__(self, config: VQGANConfig): ...

    save_component(model, "out/vqgan")            # uses model.config
    model = load_component("out/vqgan")            # class chosen by config.json's "_class"

``config.json`` holds the dataclass fields plus ``"_class"`` (the module class name) and
``"_musefast_version"``. Weights are stored with safetensors only (never pickle); tensors that
share memory (tied weights) are stored once and restored as aliases on load. Loading is strict:
any missing, unexpected or shape-mismatched key is an error that names the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from musefast.compat._convert import check_dtype

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_ALIASES_KEY = "musefast_aliases"  # safetensors metadata: JSON {alias key: stored key}

COMPONENTS: dict[str, type[nn.Module]] = {}
"""Classes that :func:`load_component` can build by name (filled by :func:`register_component`)."""


def register_component(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: make ``cls`` loadable by name. ``cls.config_class`` must be a dataclass."""
    config_class = getattr(cls, "config_class", None)
    if config_class is None or not dataclasses.is_dataclass(config_class):
        raise TypeError(f"{cls.__name__}.config_class must be a dataclass type to register it as a component")
    existing = COMPONENTS.get(cls.__name__)
    if existing is not None and existing is not cls:
        raise ValueError(f"a different component class is already registered as {cls.__name__!r}")
    COMPONENTS[cls.__name__] = cls
    return cls


def config_to_dict(config: Any) -> dict[str, Any]:
    """Dataclass -> JSON-ready dict (tuples become lists, nested dataclasses become dicts)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(config_class: type, data: Mapping[str, Any], *, source: str = "config") -> Any:
    """dict -> dataclass. Lists become tuples (JSON has no tuples); fields missing from ``data``
    take their defaults (files written before a field existed still load); unknown keys are an
    error, since silently dropping a setting would build a different model."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown {config_class.__name__} field(s) {unknown}; known: {sorted(fields)}")
    return config_class(**{k: _tuples(v) for k, v in values.items()})


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _split_shared(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store + aliases. safetensors refuses tensors that share memory: an exact
    repeat of a stored view (a tied weight) becomes an alias; any other overlap is copied."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name!r}: it is on the meta device (no data)")
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        storage = view[:2]
        if t.numel() and view in views:
            aliases[name] = views[view]
            continue
        if t.numel() and storage in storages:
            t = t.clone()
        else:
            storages.add(storage)
            views[view] = name
        tensors[name] = t.contiguous()
    return tensors, aliases


def save_component(module: nn.Module, folder: str | os.PathLike, config: Any = None) -> Path:
    """Write ``module`` to ``folder`` (created if needed) as config.json + model.safetensors.

    Args:
        module: the nn.Module; its ``state_dict()`` is saved in its current dtypes.
        folder: destination folder.
        config: the dataclass the module was built from (default: ``module.config``).

    Returns:
        the folder path.
    """
    from musefast import __version__

    if config is None:
        config = getattr(module, "config", None)
    data = config_to_dict(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _split_shared(module.state_dict())
    metadata = {"format": "pt"}
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME), metadata=metadata)
    header = {"_class": type(module).__name__, "_musefast_version": __version__}
    (folder / CONFIG_NAME).write_text(json.dumps({**header, **data}, indent=2) + "\n")
    return folder


def read_json(path: Path) -> Any:
    """A JSON file, or a ValueError naming the file and where the mistake is."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The raw ``config.json`` of a component folder (with its ``_class`` entry)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a musefast component folder")
    data = read_json(path)
    if not isinstance(data, dict) or "_class" not in data:
        raise ValueError(f"{path} has no '_class' entry: not a musefast component config")
    return data


def load_state_dict_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with tied-weight aliases restored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as exc:  # truncated or not a safetensors file
        raise ValueError(f"{path}: corrupt or truncated weights file ({exc}); re-download or re-save it") from None
    for alias, stored in aliases.items():
        state[alias] = state[stored]
    return state


def load_weights_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``module.load_state_dict(state)`` after checking that keys and shapes match exactly;
    a mismatch raises a ValueError listing missing, unexpected and mis-shaped keys and naming
    ``source`` (the file)."""
    _check_fits(module, {k: tuple(v.shape) for k, v in state.items()}, source=source)
    module.load_state_dict(state, strict=True)


def _check_fits(module: nn.Module, shapes: Mapping[str, tuple], *, source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = [f"{k}: file {shapes[k]} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(shapes)) if shapes[k] != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        lines = [f"weights in {source} do not match {type(module).__name__}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise ValueError("\n".join(lines))


def load_file_in_pieces(module: nn.Module, path: str | os.PathLike, *, piece_bytes: int = 64 * 2**20) -> None:
    """:func:`load_weights_strict` of a safetensors file without ever holding the file whole:
    keys and shapes are checked from its header, then the tensors are loaded a piece (about
    ``piece_bytes``) at a time, each piece read through its own short-lived ``safe_open`` just
    before it is copied in. Peak memory: the module plus one piece, not the module plus the file
    (plus its mapped pages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            sizes = {k: f.get_slice(k).get_dtype() for k in shapes}
            aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as exc:  # truncated or not a safetensors file
        raise ValueError(f"{path}: corrupt or truncated weights file ({exc}); re-download or re-save it") from None
    _check_fits(module, {**shapes, **{a: shapes[s] for a, s in aliases.items()}}, source=str(path))
    width = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
    pieces, size = [[]], 0
    for key, shape in shapes.items():
        if size >= piece_bytes:
            pieces.append([])
            size = 0
        pieces[-1].append(key)
        size += math.prod(shape) * width.get(sizes[key], 1)
    for keys in pieces:
        with safe_open(str(path), framework="pt") as f:
            part = {k: f.get_tensor(k) for k in keys}
        part.update({a: part[s] for a, s in aliases.items() if s in part})
        module.load_state_dict(part, strict=False)
        del part


def load_component(
    folder: str | os.PathLike,
    cls_registry: Mapping[str, type[nn.Module]] | type[nn.Module] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the module saved in ``folder`` and load its weights strictly.

    Args:
        folder: a folder written by :func:`save_component`.
        cls_registry: ``{class name: class}``, or one class (then ``_class`` must name it);
            default: every class registered with :func:`register_component`.
        device, dtype: where and in which floating dtype to put the module (default: CPU,
            float32 as constructed; the file's values are cast into it).

    Returns:
        the plain module in eval mode (how it runs — ``dtype="auto"``, the CPU paths, int8 — is
        decided once, by :func:`musefast.pipelines.loading.runnable`).
    """
    check_dtype(dtype)
    folder = Path(folder)
    data = read_config(folder)
    name = data["_class"]
    if cls_registry is None:
        cls_registry = COMPONENTS
    elif isinstance(cls_registry, type):
        cls_registry = {cls_registry.__name__: cls_registry}
    cls = cls_registry.get(name)
    if cls is None:
        raise ValueError(f"{folder / CONFIG_NAME}: unknown component class {name!r}; known: {sorted(cls_registry)}")
    config = config_from_dict(cls.config_class, data, source=str(folder / CONFIG_NAME))
    module = cls(config)
    load_file_in_pieces(module, folder / WEIGHTS_NAME)
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    return module.eval()
