"""The CPU execution path: pre-packed oneDNN linears, fused epilogues, and ``dtype="auto"``.

What it changes is *how* a model runs on a CPU, never what it computes or what it stores:

* every ``nn.Linear`` of a model gets a forward that calls oneDNN
  (``torch.ops.mkldnn._linear_pointwise``) with the weight reordered once into oneDNN's
  blocked layout (``torch.ops.mkldnn._reorder_linear_weight``). torch's own fp32 ``F.linear``
  goes through MKL, which on AMD CPUs runs far below oneDNN (DESIGN §8);
* where a linear is followed by an activation that oneDNN applies in the kernel's epilogue
  (GELU), or by a product with another tensor (GEGLU's value · GELU(gate)), the module's
  forward calls the fused op instead of the two steps;
* the packed weight is a cache held in the module's ``__dict__`` (not a parameter or buffer):
  ``state_dict``, ``save_pretrained``, ``load_state_dict`` and ``.to()`` still see the ordinary
  weight, and the cache is rebuilt when the weight changes (new storage, new dtype, or an
  in-place write, which bumps the tensor's version counter).

Off the CPU, with autograd recording, or for an input dtype other than the weight's, the
ordinary ``F.linear`` runs: the engine can stay installed when a model moves to CUDA.
:func:`apply` installs it; :func:`remove` restores the plain forwards; :func:`report` says
what was packed (``musefast doctor`` prints :func:`describe`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from musefast.engine import cpu_conv

ENGINE_ATTR = "_musefast_cpu"  # per-module state: the packed-weight cache
REPORT_ATTR = "_musefast_cpu_report"  # per-model: what apply() did
_PACKABLE = (torch.float32, torch.bfloat16)


# -- the ISA probe and dtype="auto" ------------------------------------------------------------

def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_isa() -> dict[str, bool]:
    """What the CPU offers the engine: native bf16 dot products (AVX512-BF16 or AMX) and int8
    ones (AVX512-VNNI / AVX-VNNI / AMX-INT8)."""
    flags = cpu_flags()
    return {
        "bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "int8": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags),
        "onednn": torch.backends.mkldnn.is_available(),
    }


def auto_dtype() -> torch.dtype:
    """``dtype="auto"`` on a CPU: bfloat16 where the CPU computes it natively, else float32
    (emulated bf16 is slower than fp32)."""
    isa = cpu_isa()
    return torch.bfloat16 if isa["bf16"] and isa["onednn"] else torch.float32


def auto_dtype_reason() -> str:
    """One line for ``doctor``: what ``dtype="auto"`` picks here, and why."""
    if not cpu_isa()["onednn"]:
        return "float32 (this torch has no oneDNN)"
    if cpu_isa()["bf16"]:
        return "bfloat16 (the CPU has AVX512-BF16 or AMX)"
    return "float32 (the CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated, slower than fp32)"


AUTO_BF16_MIN_PARAMS = 20_000_000
"""``dtype="auto"`` keeps smaller models in float32: their forwards are bound by per-op overhead,
not by matrix products, and bf16 only adds conversions (the embedded demo model, a few million
parameters, ran slower in bf16 than in fp32 in one measurement on a shared machine)."""


def resolve_dtype(dtype, device, weights_dtype: torch.dtype, num_params: int | None = None) -> torch.dtype | None:
    """``dtype`` as given (None = the weights'), with ``"auto"`` resolved for ``device``: on a
    CPU :func:`auto_dtype` if the weights are float32 and the model has at least
    :data:`AUTO_BF16_MIN_PARAMS` parameters (when ``num_params`` is known); half-precision
    weights stay as they are; elsewhere the weights' dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        raise ValueError(f"dtype must be a torch.dtype, None or 'auto', got {dtype!r}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    small = num_params is not None and num_params < AUTO_BF16_MIN_PARAMS
    if on_cpu and weights_dtype == torch.float32 and not small:
        return auto_dtype()
    return weights_dtype


# -- packed linears ------------------------------------------------------------------------------

_switch = threading.local()  # .off: run the plain forwards (see :func:`plain`)


@contextlib.contextmanager
def plain():
    """Run every engine-installed module through its ordinary forward inside this block (the
    reference twin of the packed path, for tests and benchmarks). Thread-local."""
    before = getattr(_switch, "off", False)
    _switch.off = True
    try:
        yield
    finally:
        _switch.off = before


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the oneDNN path applies to this call (else the ordinary F.linear runs). Under
    torch.compile the ordinary path is traced: the packed-weight cache is Python state keyed by
    data pointers, and the compiler plans its own matrix products."""
    if torch.compiler.is_compiling():
        return False
    return (not getattr(_switch, "off", False) and x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype
            and weight.dtype in _PACKABLE and weight.layout == torch.strided
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


@dataclass
class _Packed:
    """A weight reordered for oneDNN, valid while ``key`` still describes the source weight."""

    key: tuple
    weight: torch.Tensor
    bias: torch.Tensor | None


def _key(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    # data_ptr changes with new storage (.to, assign-loading), _version with in-place writes
    # (load_state_dict copies into the existing tensor).
    parts = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    return parts if bias is None else parts + (bias.data_ptr(), bias._version)


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


class _LinearState:
    """The packed-weight cache of one ``nn.Linear`` (and of its halves, for GEGLU)."""

    def __init__(self, batch_hint: int):
        self.batch_hint = batch_hint
        self.split = False  # GEGLU's input projection: packed as two halves, never whole
        self.packed: dict[str, _Packed] = {}
        self.packs = 0  # how many times a weight was (re)packed: once per load, or after a change

    def __deepcopy__(self, memo):  # a copy repacks from its own weights on first use
        fresh = _LinearState(self.batch_hint)
        fresh.split = self.split
        return fresh

    def __getstate__(self):
        return {"batch_hint": self.batch_hint, "split": self.split, "packed": {}, "packs": 0}

    def get(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> _Packed:
        key = _key(weight, bias)
        entry = self.packed.get(name)
        if entry is None or entry.key != key:
            entry = _Packed(key, _pack(weight, self.batch_hint), None if bias is None else bias.detach())
            self.packed[name] = entry
            self.packs += 1
        return entry


def _state(module: nn.Module) -> _LinearState:
    return module.__dict__[ENGINE_ATTR]


def linear(module: nn.Linear, x: torch.Tensor, attr: str = "none", *, part: str = "w",
           weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``module``'s linear map of x through the packed oneDNN weight, with the pointwise
    epilogue ``attr`` (``"none"``, ``"gelu"``, ...) applied inside the kernel. ``weight``/``bias``
    (with a distinct ``part`` name) use a slice of the module's weight instead."""
    weight = module.weight if weight is None else weight
    bias = module.bias if bias is None and part == "w" else bias
    packed = _state(module).get(part, weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if attr == "gelu":  # oneDNN's GELU: exact (erf) unless asked for "tanh"
        out = torch.ops.mkldnn._linear_pointwise(x2, packed.weight, packed.bias, "gelu", [], "none")
    else:
        out = torch.ops.mkldnn._linear_pointwise(x2, packed.weight, packed.bias, attr, [], "")
    return out.view(*shape[:-1], out.shape[-1])


def linear_mul(module: nn.Linear, x: torch.Tensor, other: torch.Tensor, *, part: str,
               weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x @ weightᵀ + bias) · other, the product applied in oneDNN's epilogue."""
    packed = _state(module).get(part, weight, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    o2 = other.reshape(x2.shape[0], -1).contiguous()
    out = torch.ops.mkldnn._linear_pointwise.binary(x2, o2, packed.weight, packed.bias, "mul")
    return out.view(*shape[:-1], out.shape[-1])


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not _usable(x, module.weight):
        return F.linear(x, module.weight, module.bias)
    return linear(module, x)


# -- fused forwards of known blocks --------------------------------------------------------------

def _feedforward_forward(module, x: torch.Tensor) -> torch.Tensor:
    """FeedForward with the GELU (gelu kind) or the GEGLU product (geglu kind) in the epilogue of
    the input projection: value · GELU(gate) = linear_mul(x, W_value, other=GELU-linear(x, W_gate))."""
    proj_in = module.proj_in
    if not _usable(x, proj_in.weight) or module.gelu_approximate != "none":
        return type(module).forward(module, x)
    if module.kind == "geglu":
        hidden = proj_in.weight.shape[0] // 2
        w_value, w_gate = proj_in.weight[:hidden], proj_in.weight[hidden:]
        b_value, b_gate = (None, None) if proj_in.bias is None else (proj_in.bias[:hidden], proj_in.bias[hidden:])
        gate = linear(proj_in, x, "gelu", part="gate", weight=w_gate, bias=b_gate)
        h = linear_mul(proj_in, x, gate, part="value", weight=w_value, bias=b_value)
    else:
        h = linear(proj_in, x, "gelu")
    if module.inner_norm is not None:
        h = module.inner_norm(h)
    return module.proj_out(h)


def _convnext_forward(module, x: torch.Tensor, mod) -> torch.Tensor:
    """UVit2D's ConvNeXt block with the GELU in the epilogue of its first channel-wise linear."""
    lin1 = module.channelwise_linear_1
    if not _usable(x, lin1.weight):
        return type(module).forward(module, x, mod)
    from musefast.models.uvit import _nchw, _nhwc

    h = _nhwc(module.depthwise(_nchw(x)))
    h = linear(lin1, module.norm(h), "gelu")
    h = module.channelwise_linear_2(module.channelwise_norm(h))
    return mod.apply(x + h)


def _fused_forwards() -> dict[type, callable]:
    from musefast.models.uvit import ConvNextBlock
    from musefast.nn.feedforward import FeedForward

    return {FeedForward: _feedforward_forward, ConvNextBlock: _convnext_forward}


# -- install / remove / report -------------------------------------------------------------------

@dataclass
class EngineReport:
    """What :func:`apply` did to one model."""

    model: str
    linears: int = 0
    fused_blocks: int = 0
    packed_bytes: int = 0
    weight_bytes: int = 0
    pack_seconds: float = 0.0
    dtype: str = ""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.model}: {self.linears} linears packed for oneDNN ({self.dtype}, "
                f"{self.packed_bytes / 2**20:.0f} MiB packed beside {self.weight_bytes / 2**20:.0f} MiB of weights, "
                f"{self.pack_seconds:.2f} s), {self.fused_blocks} blocks with fused epilogues"
                + "".join(f"; {n}" for n in self.notes))


_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models the engine was applied to, for doctor


def enabled_by_default() -> bool:
    """The engine applies at load on a CPU unless ``MUSEFAST_CPU_ENGINE=0`` or torch lacks oneDNN."""
    return os.environ.get("MUSEFAST_CPU_ENGINE", "1") != "0" and cpu_isa()["onednn"]


def apply_default(model: nn.Module) -> nn.Module:
    """What loading does (``from_pretrained``, ``musefast.load``): :func:`apply` when the
    model's weights are on the CPU and the engine is enabled (see :func:`enabled_by_default`)."""
    first = next(model.parameters(), None)
    if enabled_by_default() and first is not None and first.device.type == "cpu":
        apply(model)
        cpu_conv.apply(model)  # the VQ decoders run channels-last
    return model


def apply(model: nn.Module, *, batch_hint: int = 512, pack_now: bool = True) -> EngineReport:
    """Install the CPU path on every ``nn.Linear`` (and known block) of ``model``, in place.

    ``batch_hint``: the rows oneDNN's weight layout is chosen for (aMUSEd: 2 · 256 tokens).
    ``pack_now``: pack every CPU weight now (at load) rather than at its first call.
    Idempotent; returns (and keeps, for ``doctor``) a report."""
    report = EngineReport(type(model).__name__)
    if not cpu_isa()["onednn"]:
        report.notes.append("not applied: this torch has no oneDNN")
        return report
    fused = _fused_forwards()
    t0 = time.perf_counter()
    for module in model.modules():
        if isinstance(module, nn.Linear) and ENGINE_ATTR not in module.__dict__:
            module.__dict__[ENGINE_ATTR] = _LinearState(batch_hint)
            module.forward = functools.partial(_linear_forward, module)
    for module in model.modules():
        forward = fused.get(type(module))
        if forward is not None:
            module.forward = functools.partial(forward, module)
            report.fused_blocks += 1
            if getattr(module, "kind", None) == "geglu":
                _state(module.proj_in).split = True
    for module in model.modules():
        if isinstance(module, nn.Linear):
            report.linears += 1
            w = module.weight
            report.weight_bytes += w.numel() * w.element_size()
            if pack_now and w.device.type == "cpu" and w.dtype in _PACKABLE and not w.is_meta:
                _prepack(module)
                report.dtype = str(w.dtype).removeprefix("torch.")
    report.packed_bytes = sum(_packed_bytes(m) for m in model.modules())
    report.pack_seconds = time.perf_counter() - t0
    model.__dict__[REPORT_ATTR] = report
    _MODELS.add(model)
    return report


def _prepack(module: nn.Linear) -> None:
    """Pack what the forwards will ask for: the whole weight, or GEGLU's two halves."""
    state = _state(module)
    if not state.split:
        state.get("w", module.weight, module.bias)
        return
    hidden = module.weight.shape[0] // 2
    bias = (None, None) if module.bias is None else (module.bias[:hidden], module.bias[hidden:])
    state.get("value", module.weight[:hidden], bias[0])
    state.get("gate", module.weight[hidden:], bias[1])


def _packed_bytes(module: nn.Module) -> int:
    state = module.__dict__.get(ENGINE_ATTR)
    if state is None:
        return 0
    return sum(p.weight.numel() * p.weight.element_size() for p in state.packed.values())


def remove(model: nn.Module) -> None:
    """Restore the plain forwards and drop the packed weights."""
    cpu_conv.remove(model)
    for module in model.modules():
        module.__dict__.pop(ENGINE_ATTR, None)
        if isinstance(module.__dict__.get("forward"), functools.partial):
            del module.__dict__["forward"]
    model.__dict__.pop(REPORT_ATTR, None)
    _MODELS.discard(model)


def is_applied(model: nn.Module) -> bool:
    return any(ENGINE_ATTR in m.__dict__ for m in model.modules())


def describe() -> list[str]:
    """``doctor`` lines: what dtype="auto" picks, and what each loaded model packed."""
    isa = cpu_isa()
    lines = [f"cpu engine: oneDNN {'yes' if isa['onednn'] else 'no'}, native bf16 {'yes' if isa['bf16'] else 'no'}, "
             f"int8 dot products {'yes' if isa['int8'] else 'no'}; dtype='auto' on CPU -> {auto_dtype_reason()}"]
    if not enabled_by_default():
        lines.append("  not applied at load (MUSEFAST_CPU_ENGINE=0 or no oneDNN)")
    reports = [m.__dict__.get(REPORT_ATTR) for m in list(_MODELS)]
    lines += [f"  {r.line()}" for r in reports if r is not None and r.linears]
    return lines


__all__ = ["apply", "apply_default", "auto_dtype", "auto_dtype_reason", "cpu_isa", "describe", "enabled_by_default", "is_applied",
           "linear", "plain", "remove", "resolve_dtype", "EngineReport"]
