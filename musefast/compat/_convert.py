"""Functions shared by the weight readers and converters: strict state-dict loading with readable
errors, and the dtype a reader takes."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


class ConversionError(ValueError):
    """A checkpoint does not fit the target model: lists every offending key."""


def _listing(title: str, items: Iterable[str], limit: int = 40) -> str:
    items = sorted(items)
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more


def check_keys(source: str, keys: Iterable[str], *, used: set[str], ignored: set[str] = frozenset()) -> None:
    """Raise :class:`ConversionError` naming every key of the checkpoint that the converter
    neither used nor knows to be unused at inference."""
    unknown = set(keys) - used - set(ignored)
    if unknown:
        raise ConversionError(f"{source}: " + _listing("unknown keys", unknown))


def check_shapes(source: str, found: Mapping[str, tuple], expected: Mapping[str, tuple], *,
                 extra_label: str = "unexpected keys", expected_label: str = "model") -> None:
    """Raise one :class:`ConversionError` listing the missing keys, the extra keys (named
    ``extra_label``) and the shape mismatches of ``found`` (name -> shape) against ``expected``."""
    problems = []
    missing = set(expected) - set(found)
    extra = set(found) - set(expected)
    mismatched = [f"{k}: checkpoint {tuple(found[k])} vs {expected_label} {tuple(expected[k])}"
                  for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    if missing:
        problems.append(_listing("missing keys", missing))
    if extra:
        problems.append(_listing(extra_label, extra))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> nn.Module:
    """Copy ``state`` into ``model``; raise one :class:`ConversionError` listing missing keys,
    unexpected keys and shape mismatches (``name: checkpoint (..) vs model (..)``)."""
    own = model.state_dict()
    check_shapes(source, {k: v.shape for k, v in state.items()}, {k: v.shape for k, v in own.items()})
    model.load_state_dict({k: v.detach().to(own[k].dtype) for k, v in state.items()})
    return model


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with it removed, when any key has it; else ``state`` unchanged."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def check_dtype(dtype) -> None:
    """A reader's ``dtype``: a torch.dtype or None. ``"auto"`` depends on the machine and on how
    the component will run, which the loader decides, not a reader: a one-line error says so."""
    if dtype == "auto":
        raise ValueError("dtype='auto' is resolved when a pipeline loads (musefast.load, a pipeline's "
                         "from_pretrained, or musefast.pipelines.loading.runnable(module, dtype='auto')); "
                         "a component reader takes a torch.dtype or None")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
