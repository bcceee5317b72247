"""Files to runnable components: the one place that decides how a loaded component runs.

The format readers (:mod:`musefast.models.serialization`, :mod:`musefast.compat`, the models' and
the text encoders' ``from_pretrained``) return plain modules in the dtype they are given. A
pipeline's ``from_pretrained`` (and so ``musefast.load``) makes each component runnable here, once:

* ``dtype="auto"`` is resolved (:func:`resolve_dtype`) — before reading where the files' headers
  give the dtype and size (a float32 file is then cast as read, never held whole in float32), else
  from the module read (:func:`runnable`);
* on a CPU the CPU paths are applied: packed oneDNN linears with fused epilogues, channels-last VQ
  decoding (:mod:`musefast.cpu.linear`, :mod:`musefast.cpu.conv`);
* with ``quantize="int8"`` the linears of the transformer(s) run in int8 (:mod:`musefast.cpu.int8`).
"""
from __future__ import annotations

import torch
from torch import nn

from musefast.cpu import int8, linear as cpu_linear
from musefast.models.text import TextEncoder

AUTO_BF16_MIN_PARAMS = 20_000_000
"""``dtype="auto"`` keeps smaller models in float32: their forwards are bound by per-op overhead,
not by matrix products, and bf16 only adds conversions (the embedded demo model, a few million
parameters, ran slower in bf16 than in fp32 in one measurement on a shared machine)."""


def resolve_dtype(dtype, device, weights_dtype: torch.dtype, num_params: int | None = None) -> torch.dtype | None:
    """``dtype`` as given (None = the weights'), with ``"auto"`` resolved for ``device``: on a
    CPU :func:`musefast.cpu.linear.auto_dtype` if the weights are float32 and the model has at
    least :data:`AUTO_BF16_MIN_PARAMS` parameters (when ``num_params`` is known); half-precision
    weights stay as they are; elsewhere the weights' dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        raise ValueError(f"dtype must be a torch.dtype, None or 'auto', got {dtype!r}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    small = num_params is not None and num_params < AUTO_BF16_MIN_PARAMS
    if on_cpu and weights_dtype == torch.float32 and not small:
        return cpu_linear.auto_dtype()
    return weights_dtype


def runnable(component: nn.Module, *, device=None, dtype=None, quantize: str | None = None) -> nn.Module:
    """``component`` as its reader returned it, made runnable (in place; returned).

    ``device``/``dtype``: where to put it and in which floating dtype (None: as read; ``"auto"``:
    :func:`resolve_dtype` from its own dtype and parameter count). Then eval mode, the CPU paths
    when its weights are on the CPU (a text encoder's on its transformers model), and with
    ``quantize="int8"`` its linears in int8 (for the transformers only: the VQ and the text
    encoder stay float)."""
    int8.check(quantize)
    if dtype == "auto":
        first = next(component.parameters(), None)
        weights_dtype = torch.float32 if first is None else first.dtype
        dtype = resolve_dtype(dtype, device, weights_dtype, sum(p.numel() for p in component.parameters()))
    if device is not None or dtype is not None:
        component.to(device=device, dtype=dtype)
    component.eval()
    if quantize is not None:
        int8.apply(component)  # in place of the packed float linears, which it would remove again
    else:
        cpu_linear.apply_default(component.model if isinstance(component, TextEncoder) else component)
    return component


__all__ = ["AUTO_BF16_MIN_PARAMS", "resolve_dtype", "runnable"]
