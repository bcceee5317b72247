"""One backend registry for every op (the xformers / Liger pattern).

Each op has an ordered list of backends. A backend answers ``not_supported_reasons(*args,
**kwargs) -> list[str]`` for the concrete inputs. ``backend=None`` picks the first backend
that auto-selects for the inputs' device and has no reasons; a backend that is *asked for*
(by argument or ``MUSEFAST_BACKEND``) and cannot run raises :class:`BackendUnavailableError`
listing its reasons: never a silent fallback.

``MUSEFAST_BACKEND`` is either one backend name (``triton``: applies to every op that has a
backend of that name, the others auto-select) or per-op pairs (``vq_nearest=cpu,attention=sdpa``).
:func:`use_backend` sets the same kind of value for a block of code (it wins over the
environment); pipelines and the CLI use it for their ``backend=`` argument. A name that no op
has, or a pair naming an unknown op, is an error — a typo must not silently auto-select.

Trust is earned per device: a backend registered with ``compiled=True`` (our own
C++/CUDA/Triton code) is compared with the reference by its op's ``check`` (the checks of
:mod:`musefast.ops.selfcheck`) before it is first auto-selected on a device; one that disagrees is
skipped there (one warning, a verdict kept by :mod:`musefast.ops.verdicts`, ``musefast doctor``
says why) and the next backend runs.

Under ``torch.compile`` the public ops call :mod:`musefast.ops.traceable`'s custom ops, whose
eager bodies run this dispatch at run time, so tracing never reads the environment or a
context variable.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from musefast.ops import verdicts

logger = logging.getLogger("musefast.ops")

ReasonsFn = Callable[..., list]


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for cannot run these inputs; the message lists why."""


@dataclass
class Backend:
    name: str
    fn: Callable
    reasons: ReasonsFn
    # Device types on which this backend is chosen automatically. A backend may still *run*
    # elsewhere when asked for (e.g. triton on CPU under TRITON_INTERPRET=1, for tests).
    auto_devices: frozenset = frozenset({"cpu", "cuda"})
    # Our own compiled code (C++, CUDA, Triton): checked against the reference per device
    # before its first auto-selection. Libraries (SDPA, flash-attn) and the reference are trusted.
    compiled: bool = False


@dataclass
class Op:
    name: str
    backends: dict = field(default_factory=dict)  # insertion order = priority
    # device -> (args, kwargs): small typical inputs, used by backends() and doctor()
    probe: Callable | None = None
    # (backend name, torch.device) -> None if the backend agrees with the reference on small
    # awkward inputs there, else why not (musefast.ops.selfcheck installs it for the public ops)
    check: Callable | None = None

    def register(self, name: str, fn: Callable, reasons: ReasonsFn, *, auto_devices=("cpu", "cuda"),
                 compiled: bool = False) -> None:
        self.backends[name] = Backend(name, fn, reasons, frozenset(auto_devices), compiled)

    def auto_order(self, device_type: str) -> list[str]:
        """The backends auto-selection tries on ``device_type`` tensors, in order."""
        return [b.name for b in self.backends.values() if device_type in b.auto_devices]

    def availability(self, *args, **kwargs) -> dict:
        """backend name -> list of reasons it cannot run these inputs (empty = usable), including
        a failed self-check verdict already on record for the inputs' device."""
        device = _device_of(args)
        return {name: list(b.reasons(*args, **kwargs)) + _recorded_failure(self, b, device)
                for name, b in self.backends.items()}

    def select(self, backend: str | None, device_type: str, *args, **kwargs) -> Backend:
        requested = backend or _env_backend(self)
        if requested is not None:
            if requested not in self.backends:
                raise ValueError(
                    f"{self.name}: unknown backend {requested!r}; choose one of {list(self.backends)}"
                )
            chosen = self.backends[requested]
            reasons = chosen.reasons(*args, **kwargs) + _recorded_failure(self, chosen, _device_of(args))
            if reasons:
                raise BackendUnavailableError(
                    f"{self.name}: backend {requested!r} cannot run these inputs: " + "; ".join(reasons)
                )
            return chosen
        tried = []
        for b in self.backends.values():
            if device_type not in b.auto_devices:
                continue
            reasons = b.reasons(*args, **kwargs)
            if not reasons and b.compiled:
                reasons = _earned_trust(self, b, _device_of(args))
            if not reasons:
                return b
            tried.append(f"{b.name}: {'; '.join(reasons)}")
        raise BackendUnavailableError(f"{self.name}: no backend can run these inputs ({' | '.join(tried)})")

    def __call__(self, *args, backend: str | None = None, device_type: str, **kwargs):
        chosen = self.select(backend, device_type, *args, **kwargs)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s -> backend %s", self.name, chosen.name)
        return chosen.fn(*args, **kwargs)


def _device_of(args) -> torch.device | None:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


def _recorded_failure(the_op: Op, b: Backend, device) -> list[str]:
    if not b.compiled or device is None:
        return []
    return verdicts.recorded_failure(the_op, b.name, device)


def _earned_trust(the_op: Op, b: Backend, device) -> list[str]:
    if device is None:
        return []
    return verdicts.trust_reasons(the_op, b.name, device)


_OPS: dict[str, Op] = {}


def op(name: str) -> Op:
    """The registry entry of an op, created on first use."""
    return _OPS.setdefault(name, Op(name))


_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("musefast_backend", default=None)


@contextlib.contextmanager
def use_backend(value: str | None):
    """Within the block, ops pick backends as if ``MUSEFAST_BACKEND=value`` (None: no change)."""
    if value is None:
        yield
        return
    _parse(value, source="backend")  # validate now, not at the first op call
    token = _OVERRIDE.set(value)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def _parse(value: str, *, source: str) -> tuple[str | None, dict[str, str]]:
    """'name' -> (name, {}); 'op=name,op2=name2' -> (None, {op: name}); errors name the source."""
    value = value.strip()
    if "=" not in value:
        if not any(value in o.backends for o in _OPS.values()):
            known = sorted({b for o in _OPS.values() for b in o.backends})
            raise ValueError(f"{source}: no op has a backend named {value!r}; backends: {known}")
        return value, {}
    pairs = {}
    for pair in value.split(","):
        key, _, name = (part.strip() for part in pair.partition("="))
        if key not in _OPS:
            raise ValueError(f"{source}: unknown op {key!r} in {value!r}; ops: {sorted(_OPS)}")
        if name not in _OPS[key].backends:
            raise ValueError(f"{source}: op {key!r} has no backend {name!r}; choose one of {list(_OPS[key].backends)}")
        pairs[key] = name
    return None, pairs


def _env_backend(the_op: Op) -> str | None:
    override = _OVERRIDE.get()
    value, source = (override, "backend") if override is not None else (
        os.environ.get("MUSEFAST_BACKEND", ""), "MUSEFAST_BACKEND")
    if not value.strip():
        return None
    single, pairs = _parse(value, source=source)
    if single is not None:
        return single if single in the_op.backends else None
    return pairs.get(the_op.name)


def backends(device: str | torch.device | None = None) -> dict:
    """op -> {backend: "ok" | why it is unavailable}, probed with small inputs on ``device``.

    The probe answers for typical inputs; a backend can still refuse particular inputs
    (dtype, shape) at call time, with its reasons.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    table = {}
    for name, the_op in _OPS.items():
        if the_op.probe is None:
            continue
        args, kwargs = the_op.probe(device)
        table[name] = {
            b: ("ok" if not reasons else "; ".join(reasons))
            for b, reasons in the_op.availability(*args, **kwargs).items()
        }
    return table
