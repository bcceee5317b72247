"""The CPU execution path: pre-packed oneDNN linears, fused epilogues, and what ``dtype="auto"`` picks here.

What it changes is *how* a model runs on a CPU, never what it computes or what it saves:

* every ``nn.Linear`` of a model gets a forward that calls oneDNN
  (``torch.ops.mkldnn._linear_pointwise``) with the weight reordered once into oneDNN's
  blocked layout (``torch.ops.mkldnn._reorder_linear_weight``). torch's own fp32 ``F.linear``
  goes through MKL, which on AMD CPUs runs far below oneDNN (about 2.5× slower, measured);
* where a linear is followed by an activation that oneDNN applies in the kernel's epilogue
  (GELU), or by a product with another tensor (GEGLU's value · GELU(gate)), the module's
  forward calls the fused op instead of the two steps;
* the packed weight is held in the module's ``__dict__`` (not a parameter or buffer), and by
  default it is the **only** copy: once a linear is packed (at load, module by module) its
  ``weight`` Parameter keeps its identity, shape, dtype and device but gives up its storage (a
  ``_ReleasedWeight`` stand-in), so a model on the CPU holds its weights once, not twice
  (target: peak memory ≤ 1.3× the weights). The plain weight is rebuilt exactly (oneDNN's
  reorder back to the plain layout moves values, computes nothing) wherever one is needed:
  ``state_dict`` / ``save_pretrained`` (a state-dict hook), ``load_state_dict`` (restored, copied
  into, repacked, released), ``.to()`` / ``.half()`` / ``.cuda()`` (the module's ``_apply``:
  restored, converted, repacked and released again if still a CPU fp32/bf16 weight),
  ``copy.deepcopy`` (the copy shares the immutable packed weights), pickling, :func:`remove`,
  :func:`restore_weights`, the :func:`plain` reference twin and the ordinary-path fallbacks
  (rebuilt per call; autograd restores the Parameter for good). Any other read of a released
  weight raises a RuntimeError naming the fix. ``MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS=1`` keeps the
  plain copies (2× memory; the packed cache then follows the weight: it is rebuilt when the
  weight changes — new storage, new dtype, or an in-place write, which bumps the tensor's
  version counter).

What oneDNN holds a weight in follows the instruction set it may use (:mod:`musefast.cpu.isa`):
fp32 as fp32; bf16 as bf16 from AVX-512 up, and as float32 (the values widened exactly, inputs and
outputs converted per call) on AVX2, where oneDNN has no bf16 kernels; fp16 always as float32.
Below AVX2 (or without oneDNN) nothing is packed and the plain PyTorch path runs.

Off the CPU, with autograd recording, or for an input dtype other than the weight's, the
ordinary ``F.linear`` runs: the engine can stay installed when a model moves to CUDA.
:func:`apply` installs it; :func:`remove` restores the plain forwards and weights; ``musefast doctor``
prints :func:`describe` (per model: packed bytes, released bytes).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from musefast.cpu import conv as cpu_conv, isa, twin

ENGINE_ATTR = "_musefast_cpu"  # per-module state: the packed-weight cache
REPORT_ATTR = "_musefast_cpu_report"  # per-model: what apply() did
_PACKABLE = (torch.float32, torch.bfloat16, torch.float16)


def _packed_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype oneDNN holds a ``dtype`` weight in: bf16 as itself where oneDNN has bf16 kernels
    (AVX-512 and up), else — and always for fp16, which it only has on AVX512-FP16/AMX — float32,
    the values widened exactly (a product of two bf16 or fp16 numbers is exact in float32, so only
    the summation order differs from PyTorch's plain bf16/fp16 kernels, which also sum in float32)."""
    if dtype == torch.bfloat16 and isa.effective()["bf16_packs"]:
        return dtype
    return torch.float32


# -- the ISA probe and what dtype="auto" picks on this CPU ------------------------------------------------------------

cpu_flags = isa.cpu_flags


def cpu_isa() -> dict[str, bool]:
    """What oneDNN may use here (the CPU's flags within ``ONEDNN_MAX_CPU_ISA``: see
    :mod:`musefast.cpu.isa`): native bf16 dot products (AVX512-BF16 or AMX) and int8 ones (VNNI)."""
    eff = isa.effective()
    return {"bf16": eff["bf16"], "int8": eff["vnni"], "onednn": eff["onednn"]}


def auto_dtype() -> torch.dtype:
    """``dtype="auto"`` on a CPU: bfloat16 where the CPU computes it natively, else float32
    (emulated bf16 is slower than fp32)."""
    isa_ = cpu_isa()
    return torch.bfloat16 if isa_["bf16"] and isa_["onednn"] else torch.float32


def auto_dtype_reason() -> str:
    """One line for ``doctor``: what ``dtype="auto"`` picks here, and why."""
    if not cpu_isa()["onednn"]:
        return "float32 (this torch has no oneDNN)"
    if cpu_isa()["bf16"]:
        return "bfloat16 (oneDNN may use AVX512-BF16 or AMX here)"
    return ("float32 (neither AVX512-BF16 nor AMX within oneDNN's reach here: bf16 would be emulated, "
            "slower than fp32)")


# -- packed linears ------------------------------------------------------------------------------

_switch = twin.SWITCH  # .off: run the plain forwards (see :func:`plain`); shared with every CPU path


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


def plain_active() -> bool:
    """Whether this thread is inside :func:`plain` (every CPU fast path then runs its twin)."""
    return getattr(_switch, "off", False)


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the oneDNN path applies to this call (else the ordinary F.linear runs). Under
    torch.compile the ordinary path is traced: the packed-weight cache is Python state keyed by
    data pointers, and the compiler plans its own matrix products."""
    if torch.compiler.is_compiling():
        return False
    return (not plain_active() and x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype
            and weight.dtype in _PACKABLE and weight.layout == torch.strided
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class _ReleasedWeight(torch.Tensor):
    """What a linear's ``weight`` Parameter holds once the engine released its plain storage: the
    weight's shape, dtype, device and ``requires_grad``, no data. The packed copy is the only one;
    the engine rebuilds the plain weight from it (exactly) wherever one is needed, and any other
    read raises, naming the fix, rather than computing with a placeholder."""

    @staticmethod
    def __new__(cls, state: "_LinearState", like: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, like.shape, dtype=like.dtype, device=like.device,
                                                requires_grad=like.requires_grad)
        t._engine_state = state
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:  # nn.Parameter(...) detaches its data
            return _ReleasedWeight(args[0]._engine_state, args[0])
        raise RuntimeError(
            f"musefast CPU engine: {func} read a linear weight whose plain copy was released after packing "
            f"(it lives in oneDNN's layout only); call musefast.cpu.linear.restore_weights(model) first, "
            f"or load with MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS=1")

    def __repr__(self):
        return f"ReleasedWeight(shape={tuple(self.shape)}, dtype={self.dtype}; packed for oneDNN)"

    def __deepcopy__(self, memo):  # the copy shares the (immutable) packed weights
        new = _ReleasedWeight(copy.deepcopy(self._engine_state, memo), self)
        if getattr(self, "_is_param", False):
            new = nn.Parameter(new, requires_grad=self.requires_grad)
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol):  # pickling (torch.save of a whole module) stores the plain weight
        plain = self._engine_state.plain_weight()
        if getattr(self, "_is_param", False):
            plain = nn.Parameter(plain, requires_grad=self.requires_grad)
        return plain.__reduce_ex__(protocol)


def is_released(weight: torch.Tensor) -> bool:
    return isinstance(weight, _ReleasedWeight)


@dataclass
class _Packed:
    """A weight reordered for oneDNN, valid while ``key`` still describes the source weight."""

    key: tuple
    weight: torch.Tensor


def _key(weight: torch.Tensor) -> tuple:
    # data_ptr changes with new storage (.to, assign-loading), _version with in-place writes
    # (load_state_dict copies into the existing tensor).
    return (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(_packed_dtype(weight.dtype)), rows)


def _rows(module: nn.Linear, part: str) -> slice:
    """The rows of ``module.weight`` (and bias) that ``part`` names: GEGLU's input projection is
    packed as two halves, ``value`` (first) and ``gate`` (second), never whole."""
    hidden = module.out_features // 2
    return {"w": slice(None), "value": slice(0, hidden), "gate": slice(hidden, None)}[part]


class _LinearState:
    """The packed-weight cache of one ``nn.Linear`` (and of its halves, for GEGLU), and whether
    the plain weight was released (then the packed weights are the only copy)."""

    def __init__(self, batch_hint: int, release: bool = False):
        self.batch_hint = batch_hint
        self.split = False  # GEGLU's input projection: packed as two halves, never whole
        self.release = release  # wanted: drop the plain weight whenever it is packed on the CPU
        self.released = False  # now: module.weight is a _ReleasedWeight
        self.packed: dict[str, _Packed] = {}
        self.packs = 0  # how many times a weight was (re)packed: once per load, or after a change

    @property
    def parts(self) -> tuple[str, ...]:
        return ("value", "gate") if self.split else ("w",)

    def __deepcopy__(self, memo):
        fresh = _LinearState(self.batch_hint, self.release)
        fresh.split = self.split
        if self.released:  # the packed weights are the only copy: share them (never written in place)
            fresh.released, fresh.packed = True, dict(self.packed)
        return fresh  # else the copy repacks from its own weights on first use

    def __getstate__(self):  # pickled with the plain weight (_ReleasedWeight.__reduce_ex__): repack on use
        return {"batch_hint": self.batch_hint, "split": self.split, "release": False, "released": False,
                "packed": {}, "packs": 0}

    def get(self, part: str, module: nn.Linear) -> _Packed:
        if self.released:
            return self.packed[part]
        weight = module.weight[_rows(module, part)]
        key = _key(weight)
        entry = self.packed.get(part)
        if entry is None or entry.key != key:
            entry = _Packed(key, _pack(weight, self.batch_hint))
            self.packed[part] = entry
            self.packs += 1
        return entry

    def plain_weight(self) -> torch.Tensor:
        """The plain weight rebuilt from the packed one: oneDNN's reorder back to the plain
        layout moves values, never computes, so it is exact."""
        return torch.cat([self.packed[p].weight.to_dense().to(self.packed[p].key[2]) for p in self.parts])


def _state(module: nn.Module) -> _LinearState:
    return module.__dict__[ENGINE_ATTR]


def _bias(module: nn.Linear, part: str, dtype: torch.dtype) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()[_rows(module, part)].to(dtype)


def linear(module: nn.Linear, x: torch.Tensor, attr: str = "none", *, part: str = "w") -> torch.Tensor:
    """``module``'s linear map of x through the packed oneDNN weight, with the pointwise
    epilogue ``attr`` (``"none"``, ``"gelu"``, ...) applied inside the kernel. ``part``: the
    whole weight (``"w"``) or one of GEGLU's halves (``"value"``, ``"gate"``)."""
    packed = _state(module).get(part, module)
    shape, dtype = x.shape, packed.weight.dtype
    x2 = x.reshape(-1, shape[-1]).to(dtype)  # widened where the weight was (see _packed_dtype)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    # oneDNN's GELU: exact (erf) unless asked for "tanh"
    algorithm = "none" if attr == "gelu" else ""
    out = torch.ops.mkldnn._linear_pointwise(x2, packed.weight, _bias(module, part, dtype), attr, [], algorithm)
    return out.to(x.dtype).view(*shape[:-1], out.shape[-1])


def linear_mul(module: nn.Linear, x: torch.Tensor, other: torch.Tensor, *, part: str) -> torch.Tensor:
    """(x @ weight[part]ᵀ + bias[part]) · other, the product applied in oneDNN's epilogue."""
    packed = _state(module).get(part, module)
    shape, dtype = x.shape, packed.weight.dtype
    x2 = x.reshape(-1, shape[-1]).to(dtype).contiguous()
    o2 = other.reshape(x2.shape[0], -1).to(dtype).contiguous()
    out = torch.ops.mkldnn._linear_pointwise.binary(x2, o2, packed.weight, _bias(module, part, dtype), "mul")
    return out.to(x.dtype).view(*shape[:-1], out.shape[-1])


def linear_add(module: nn.Linear, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + module(x)``, the add applied in oneDNN's epilogue (its binary ``add`` post-op)
    where the packed path runs, so the linear's output is written once instead of written, read
    back and written again; elsewhere (the reference twin, CUDA, autograd, a GEGLU projection, a
    residual of another shape or dtype) the two ordinary steps. ``residual`` has the output's shape."""
    out_shape = (*x.shape[:-1], module.out_features)
    if (ENGINE_ATTR not in module.__dict__ or not runs_packed(module, x) or _state(module).split
            or torch.compiler.is_compiling()
            or tuple(residual.shape) != out_shape or residual.dtype != x.dtype or residual.device != x.device):
        return residual + module(x)
    packed = _state(module).get("w", module)
    dtype = packed.weight.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    r2 = residual.reshape(x2.shape[0], -1).to(dtype).contiguous()
    out = torch.ops.mkldnn._linear_pointwise.binary(x2, r2, packed.weight, _bias(module, "w", dtype), "add")
    return out.to(x.dtype).view(out_shape)


def runs_packed(module: nn.Linear, x: torch.Tensor) -> bool:
    """Whether this call of ``module`` takes the oneDNN path. Under torch.compile a kept weight
    takes the ordinary path (the cache is Python state keyed by data pointers; the compiler plans
    its own products), a released one the packed path (the only copy; traced as an op)."""
    state = _state(module)
    if torch.compiler.is_compiling():
        return state.released
    return _usable(x, module.weight)


def _readable_weight(module: nn.Linear) -> torch.Tensor:
    """The weight for an ordinary F.linear: rebuilt for this call from the packed one if it was
    released, or restored for good when autograd must reach the Parameter."""
    weight = module.weight
    if not is_released(weight):
        return weight
    if torch.compiler.is_compiling():
        raise RuntimeError("musefast CPU engine: this released weight can only run the packed path under "
                           "torch.compile (CPU, the weight's dtype, no autograd); call "
                           "musefast.cpu.linear.restore_weights(model) before compiling")
    if torch.is_grad_enabled() and weight.requires_grad:
        _restore(module)
        return module.weight
    return _state(module).plain_weight()


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not runs_packed(module, x):
        return F.linear(x, _readable_weight(module), module.bias)
    if _state(module).split:  # GEGLU's projection called whole (e.g. tanh GELU): its two halves
        return torch.cat([linear(module, x, part=p) for p in _state(module).parts], dim=-1)
    return linear(module, x)


# -- releasing and restoring the plain weight ---------------------------------------------------

def _release(module: nn.Linear) -> int:
    """Swap the plain weight for a :class:`_ReleasedWeight` in place (the Parameter object stays
    the same, so references to it see the change), once every part is packed; returns the bytes
    freed (0 when it could not: autograd or a weak reference still holds the tensor)."""
    state, weight = _state(module), module.weight
    if state.released or not all(state.get(p, module) for p in state.parts):
        return 0
    stand_in = nn.Parameter(_ReleasedWeight(state, weight), requires_grad=weight.requires_grad)
    stand_in.__dict__.update({k: v for k, v in weight.__dict__.items() if k not in stand_in.__dict__})
    try:
        torch.utils.swap_tensors(weight, stand_in)
    except RuntimeError:
        return 0
    state.released = True
    return stand_in.numel() * stand_in.element_size()


def _restore(module: nn.Linear) -> None:
    """Put the plain weight (rebuilt exactly from the packed one) back into the same Parameter."""
    state, weight = _state(module), module.weight
    plain = nn.Parameter(state.plain_weight(), requires_grad=weight.requires_grad)
    plain.__dict__.update({k: v for k, v in weight.__dict__.items() if k not in ("_engine_state", "_is_param")})
    torch.utils.swap_tensors(weight, plain)
    state.released = False
    for part, entry in state.packed.items():  # still the same values: re-key, no repack
        entry.key = _key(weight[_rows(module, part)])


def _releasable(module: nn.Linear) -> bool:
    w = module.weight
    return (w.device.type == "cpu" and w.dtype in _PACKABLE and w.layout == torch.strided and not w.is_meta
            and not is_released(w))


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """state_dict / save_pretrained see the plain weight, rebuilt for them."""
    key = prefix + "weight"
    if key in state_dict and is_released(state_dict[key]):
        state_dict[key] = _state(module).plain_weight()


def _load_pre_hook(module, state_dict, prefix, *args):
    """load_state_dict copies into the plain weight: restore it first (repacked after)."""
    if ENGINE_ATTR in module.__dict__ and _state(module).released:
        _restore(module)


def _load_post_hook(module, incompatible_keys):
    if ENGINE_ATTR in module.__dict__ and _state(module).release and _releasable(module):
        _release(module)


def _engine_apply(module: nn.Linear, fn, recurse: bool = True):
    """Module._apply (.to(), .half(), .cuda(), ...) on the plain weight, then pack and release
    again where the weight is still a CPU fp32/bf16 one (one module at a time: a bounded peak)."""
    state = _state(module)
    if state.released:
        _restore(module)
    out = type(module)._apply(module, fn, recurse)
    if state.release and _releasable(module):
        _release(module)
    elif not _releasable(module):
        state.packed.clear()  # off the CPU or in a dtype oneDNN does not take: nothing to keep
    return out


def restore_weights(model: nn.Module) -> int:
    """Give every released linear of ``model`` its plain weight back (and stop releasing it, so
    ``.to()`` and loading keep it too); the packed path still runs. Returns the bytes restored."""
    restored = 0
    for module in model.modules():
        state = module.__dict__.get(ENGINE_ATTR)
        if state is not None:
            state.release = False
            if state.released:
                _restore(module)
                restored += module.weight.numel() * module.weight.element_size()
    return restored


# -- fused forwards of blocks ---------------------------------------------------------------------

_FUSED: dict[type, Callable] = {}


def fused_forward(cls: type) -> Callable:
    """Decorator: the decorated ``forward(module, *args)`` is what :func:`apply` installs on every
    ``cls`` block of a model — a forward that puts the block's activations into the epilogues of
    its packed linears with :func:`runs_packed`, :func:`linear` and :func:`linear_mul`, and runs
    the block's own forward where the packed path does not apply. Each block registers its own
    (next to its class), so the CPU path imports no model class."""
    def register(forward: Callable) -> Callable:
        _FUSED[cls] = forward
        return forward

    return register


# -- install / remove / report -------------------------------------------------------------------

@dataclass
class EngineReport:
    """What :func:`apply` did to one model."""

    model: str
    linears: int = 0
    fused_blocks: int = 0
    packed_bytes: int = 0
    weight_bytes: int = 0
    released_bytes: int = 0
    pack_seconds: float = 0.0
    dtype: str = ""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.released_bytes:
            rest = self.weight_bytes - self.released_bytes
            kept = (f"plain copies of {self.released_bytes / 2**20:.0f} MiB released"
                    + (f", {rest / 2**20:.0f} MiB kept" if rest > 0 else "")
                    + "; MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS=1 keeps them")
        else:
            kept = f"beside {self.weight_bytes / 2**20:.0f} MiB of plain weights"
        return (f"{self.model}: {self.linears} linears packed for oneDNN ({self.dtype}, "
                f"{self.packed_bytes / 2**20:.0f} MiB packed, {kept}, {self.pack_seconds:.2f} s), "
                f"{self.fused_blocks} blocks with fused epilogues" + "".join(f"; {n}" for n in self.notes))


_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models the engine was applied to, for doctor


def enabled_by_default() -> bool:
    """The engine applies at load on a CPU unless ``MUSEFAST_CPU_ENGINE=0``, torch lacks oneDNN, or
    oneDNN may not use AVX2 here (the ``none`` path of :mod:`musefast.cpu.isa`: plain PyTorch)."""
    return os.environ.get("MUSEFAST_CPU_ENGINE", "1") != "0" and isa.effective()["path"] != "none"


def release_by_default() -> bool:
    """The engine drops each plain weight once packed unless ``MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS=1``."""
    return os.environ.get("MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS", "0") != "1"


def apply_default(model: nn.Module) -> nn.Module:
    """What loading does (``from_pretrained``, ``musefast.load``): :func:`apply` when the
    model's weights are on the CPU and the engine is enabled (see :func:`enabled_by_default`)."""
    first = next(model.parameters(), None)
    if enabled_by_default() and first is not None and first.device.type == "cpu":
        apply(model)
        cpu_conv.apply(model)  # the VQ decoders run channels-last
    return model


def apply(model: nn.Module, *, batch_hint: int = 512, pack_now: bool = True,
          release: bool | None = None) -> EngineReport:
    """Install the CPU path on every ``nn.Linear`` (and known block) of ``model``, in place.

    ``batch_hint``: the rows oneDNN's weight layout is chosen for (aMUSEd: 2 · 256 tokens).
    ``pack_now``: pack every CPU weight now (at load) rather than at its first call.
    ``release``: drop each plain weight once packed, module by module (default: yes, unless
    ``MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS=1``); a weight shared with another module is kept.
    Idempotent; returns (and keeps, for ``doctor``) a report."""
    report = EngineReport(type(model).__name__)
    if not cpu_isa()["onednn"]:
        report.notes.append("not applied: this torch has no oneDNN")
        return report
    if isa.effective()["path"] == "none":
        report.notes.append("not applied: no AVX2 within oneDNN's reach here (the plain PyTorch path runs)")
        return report
    release = release_by_default() if release is None else release
    fused = _FUSED
    t0 = time.perf_counter()
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for module in model.modules():
        if isinstance(module, nn.Linear) and ENGINE_ATTR not in module.__dict__:
            shared = uses[id(module.weight)] > 1  # tied (e.g. to an embedding that reads it): keep it
            module.__dict__[ENGINE_ATTR] = _LinearState(batch_hint, release and pack_now and not shared)
            module.forward = functools.partial(_linear_forward, module)
            module._apply = functools.partial(_engine_apply, module)
            module._register_state_dict_hook(_state_dict_hook)
            module.register_load_state_dict_pre_hook(_load_pre_hook)
            module.register_load_state_dict_post_hook(_load_post_hook)
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
            if pack_now and (_releasable(module) or is_released(w)):
                state = _state(module)
                for part in state.parts:  # what the forwards will ask for: the whole weight or GEGLU's halves
                    state.get(part, module)
                if state.release:
                    _release(module)
                report.dtype = str(w.dtype).removeprefix("torch.")
                if _packed_dtype(w.dtype) != w.dtype and not report.notes:
                    report.notes.append(f"{report.dtype} weights packed as float32 (no oneDNN {report.dtype} "
                                        f"kernels on this ISA: {isa.effective()['path']})")
            if is_released(module.weight):
                report.released_bytes += w.numel() * w.element_size()
    report.packed_bytes = sum(_packed_bytes(m) for m in model.modules())
    report.pack_seconds = time.perf_counter() - t0
    model.__dict__[REPORT_ATTR] = report
    _MODELS.add(model)
    return report


def _packed_bytes(module: nn.Module) -> int:
    state = module.__dict__.get(ENGINE_ATTR)
    if state is None:
        return 0
    return sum(p.weight.numel() * p.weight.element_size() for p in state.packed.values())


_HOOKS = (("_state_dict_hooks", _state_dict_hook), ("_load_state_dict_pre_hooks", _load_pre_hook),
          ("_load_state_dict_post_hooks", _load_post_hook))


def remove(model: nn.Module) -> None:
    """Restore the plain forwards and weights, drop the packed weights, and give the VQ decoders
    back their plain (NCHW) convolutions."""
    cpu_conv.remove(model)
    restore_weights(model)
    for module in model.modules():
        if module.__dict__.pop(ENGINE_ATTR, None) is not None:
            module.__dict__.pop("_apply", None)
            for attr, hook in _HOOKS:
                hooks = getattr(module, attr)
                for key in [k for k, h in hooks.items() if getattr(h, "hook", h) is hook]:
                    del hooks[key]
        if isinstance(module.__dict__.get("forward"), functools.partial):
            del module.__dict__["forward"]
    model.__dict__.pop(REPORT_ATTR, None)
    _MODELS.discard(model)


def is_applied(model: nn.Module) -> bool:
    return any(ENGINE_ATTR in m.__dict__ for m in model.modules())


def describe() -> list[str]:
    """``doctor`` lines: what dtype="auto" picks, and what each loaded model packed."""
    have = cpu_isa()
    lines = [f"cpu engine: oneDNN {'yes' if have['onednn'] else 'no'}, native bf16 {'yes' if have['bf16'] else 'no'}, "
             f"int8 dot products {'yes' if have['int8'] else 'no'}; dtype='auto' on CPU -> {auto_dtype_reason()}"]
    if not enabled_by_default():
        lines.append("  not applied at load (MUSEFAST_CPU_ENGINE=0, no oneDNN, or no AVX2 within its reach)")
    reports = [m.__dict__.get(REPORT_ATTR) for m in list(_MODELS)]
    lines += [f"  {r.line()}" for r in reports if r is not None and r.linears]
    return lines


__all__ = ["apply", "apply_default", "auto_dtype", "auto_dtype_reason", "cpu_isa", "describe", "enabled_by_default", "is_applied",
           "is_released", "linear", "linear_add", "plain", "plain_active", "release_by_default", "remove", "restore_weights",
           "EngineReport", "fused_forward", "linear_mul", "runs_packed"]
