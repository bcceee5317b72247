"""The opt-in int8 CPU path (``quantize="int8"``): every ``nn.Linear`` of a transformer multiplies
int8 integers with VNNI dot products through oneDNN.

What it computes is defined by :mod:`musefast.reference.int8_linear`: weights quantized per output
channel once (at install), inputs per token at every call, both symmetric in [-127, 127]. Why
this op (``torch.ops.onednn.qlinear_pointwise``), measured on the aMUSEd-256 linears at B = 2 with
2 threads (``scripts/eval_int8.py`` records the comparison): fbgemm's ``quantized.linear_dynamic``
quantizes the input per *tensor* (one outlier token coarsens every other) and is built on the
deprecated quantized-tensor API; weight-only int8 (``aten._weight_int8pack_mm``) ran 3× slower
than bf16 here. oneDNN takes one input scale per call, so the per-token scale is passed as 1 with
the integers shifted to uint8 (zero point 128, exact) and applied to the output rows afterwards —
which is also why GELU/GEGLU are not fused into the epilogue here: they must follow that scaling.

The int8 weight is a cache beside the module's ordinary weight, as in :mod:`musefast.cpu.linear`:
``state_dict``/``save_pretrained`` still see (and save) the float weights, and the cache is
rebuilt when the weight changes. A model saved after quantizing saves float weights; quantize
again after loading. The CPU engine's packed float linears are removed from a model this path
is installed on (each linear has one fast path). Inference only, CPU only: a call on another
device, or one that autograd records, is refused with the fix in the message.
"""
from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from musefast.cpu import linear as cpu
from musefast.reference.int8_linear import QMAX, int8_linear, quantize_rows

QUANTIZE_CHOICES = ("int8",)
STATE_ATTR = "_musefast_int8"  # per-linear: the int8 weight cache
REPORT_ATTR = "_musefast_int8_report"  # per-model: what apply() did
_ZERO_POINT = 128  # int8 input integers shifted to oneDNN's uint8 input: exact, undone by the zero point


def unavailable_reasons() -> list[str]:
    """Why the int8 path cannot run in this process (empty: it can)."""
    reasons = []
    if not cpu.cpu_isa()["int8"]:  # without VNNI oneDNN's u8·s8 pair sums saturate: wrong, not slow
        reasons.append("no int8 dot products within oneDNN's reach (it needs VNNI: AVX512-VNNI, AVX-VNNI or "
                       "AMX-INT8; ONEDNN_MAX_CPU_ISA may cap them off)")
    if not cpu.cpu_isa()["onednn"]:
        reasons.append("this torch has no oneDNN")
    elif not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        reasons.append(f"torch {torch.__version__} has no torch.ops.onednn.qlinear_pointwise")
    return reasons


def check(quantize, device=None) -> None:
    """Validate a ``quantize=`` argument before anything loads: None, or ``"int8"`` on a CPU that
    can run it (else a one-line error naming the fix)."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"quantize='int8' runs on the CPU only, not on {device}: load with device='cpu' or without quantize")
    reasons = unavailable_reasons()
    if reasons:
        raise ValueError(f"quantize='int8' cannot run here: {'; '.join(reasons)}. Load without quantize "
                         "(float32/bfloat16 run through the CPU engine)")


# -- the int8 linear -----------------------------------------------------------------------------

@dataclass
class _Packed:
    key: tuple
    weight: torch.Tensor  # oneDNN's packed int8 weight
    scale: torch.Tensor  # (N,) float32, per output channel
    zero_points: torch.Tensor  # (N,) zeros: the weights are symmetric


def _key(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """The engine's weight key plus the bias's: the int8 pack holds the bias too."""
    parts = cpu._key(weight)
    return parts if bias is None else parts + (bias.data_ptr(), bias._version)


class _Int8State:
    """The int8 weight cache of one ``nn.Linear``, rebuilt when the float weight changes."""

    def __init__(self, batch_hint: int):
        self.batch_hint = batch_hint
        self.packed: _Packed | None = None
        self.packs = 0

    def __deepcopy__(self, memo):  # a copy quantizes its own weights on first use
        return _Int8State(self.batch_hint)

    def __getstate__(self):
        return {"batch_hint": self.batch_hint, "packed": None, "packs": 0}

    def get(self, weight: torch.Tensor, bias: torch.Tensor | None) -> _Packed:
        key = _key(weight, bias)
        if self.packed is None or self.packed.key != key:
            q, scale = quantize_rows(weight)
            packed = torch.ops.onednn.qlinear_prepack(q, [self.batch_hint, weight.shape[1]])
            self.packed = _Packed(key, packed, scale.view(-1), torch.zeros(weight.shape[0], dtype=torch.long))
            self.packs += 1
        return self.packed


def _quantize_input(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (M, K) -> (uint8 integers + 128, float32 per-token scales (M, 1)); the same integers as
    :func:`musefast.reference.int8_linear.quantize_rows`, in fewer passes over x."""
    lo, hi = torch.aminmax(x2, dim=1, keepdim=True)
    amax = torch.maximum(hi, -lo).float()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.div(x2, scale).round_().clamp_(-QMAX, QMAX).add_(_ZERO_POINT)
    return q.to(torch.uint8), scale


def linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module``'s linear map of x (..., K) through its int8 weight (see the module docstring)."""
    packed = module.__dict__[STATE_ATTR].get(module.weight, module.bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    qx, scale = _quantize_input(x2)
    out = torch.ops.onednn.qlinear_pointwise(qx, 1.0, _ZERO_POINT, packed.weight, packed.scale, packed.zero_points,
                                             None, 1.0, 0, torch.float32, "none", [], "")
    out.mul_(scale)  # the per-token input scale (oneDNN was given 1)
    if module.bias is not None:
        out.add_(module.bias)
    return out.to(x.dtype).view(*shape[:-1], out.shape[-1])


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or module.weight.device.type != "cpu":
        raise RuntimeError("int8 linears run on the CPU only: call musefast.cpu.int8.remove(model) "
                           "before moving the model to another device")
    if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad):
        raise RuntimeError("int8 linears are for inference: run the model under torch.no_grad() or "
                           "torch.inference_mode(), or call musefast.cpu.int8.remove(model) to train")
    if torch.compiler.is_compiling():  # the cache is Python state keyed by data pointers: trace the definition
        return int8_linear(x, module.weight, module.bias)
    return linear(module, x)


# -- install / remove / report -------------------------------------------------------------------

@dataclass
class Int8Report:
    """What :func:`apply` did to one model."""

    model: str
    linears: int = 0
    int8_bytes: int = 0
    weight_bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"{self.model}: {self.linears} linears in int8 ({self.int8_bytes / 2**20:.0f} MiB of int8 weights "
                f"beside {self.weight_bytes / 2**20:.0f} MiB of float weights, {self.seconds:.2f} s)")


_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models quantized in this process, for doctor


def apply(model: nn.Module, *, batch_hint: int = 512) -> Int8Report:
    """Quantize every ``nn.Linear`` of ``model`` (a transformer) to int8, in place, replacing the
    CPU engine's packed float linears. ``batch_hint``: the rows oneDNN packs the weights for (aMUSEd:
    2 · 256 tokens). Raises ValueError where the path cannot run (see :func:`check`) or when the
    model's weights are not on the CPU. Idempotent; returns (and keeps, for ``doctor``) a report."""
    check("int8")
    off_cpu = sorted({str(p.device) for p in model.parameters() if p.device.type != "cpu"})
    if off_cpu:
        raise ValueError(f"quantize='int8' runs on the CPU only, the model has weights on {', '.join(off_cpu)}: "
                         "move it with .to('cpu') first")
    cpu.remove(model)
    report = Int8Report(type(model).__name__)
    t0 = time.perf_counter()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            state = module.__dict__.setdefault(STATE_ATTR, _Int8State(batch_hint))
            module.forward = functools.partial(_forward, module)
            packed = state.get(module.weight, module.bias)
            report.linears += 1
            report.int8_bytes += module.weight.numel() + packed.scale.numel() * 4
            report.weight_bytes += module.weight.numel() * module.weight.element_size()
    report.seconds = time.perf_counter() - t0
    model.__dict__[REPORT_ATTR] = report
    _MODELS.add(model)
    return report


def remove(model: nn.Module) -> None:
    """Restore the plain float forwards (the CPU engine is not reinstalled: ``cpu.apply(model)``)."""
    for module in model.modules():
        if module.__dict__.pop(STATE_ATTR, None) is not None:
            module.__dict__.pop("forward", None)
    model.__dict__.pop(REPORT_ATTR, None)
    _MODELS.discard(model)


def is_applied(model: nn.Module) -> bool:
    return any(STATE_ATTR in m.__dict__ for m in model.modules())


def describe() -> list[str]:
    """``doctor`` lines: whether ``quantize="int8"`` can run here, and what each quantized model holds."""
    reasons = unavailable_reasons()
    lines = ["int8 path (quantize='int8', opt-in): " + ("available (oneDNN int8 linears, per-token inputs)"
                                                       if not reasons else "unavailable: " + "; ".join(reasons))]
    reports = [m.__dict__.get(REPORT_ATTR) for m in list(_MODELS)]
    lines += [f"  {r.line()}" for r in reports if r is not None]
    return lines


__all__ = ["QUANTIZE_CHOICES", "Int8Report", "apply", "check", "describe", "is_applied", "linear",
           "remove", "unavailable_reasons"]
