"""The reference-twin switch that every CPU fast path reads: inside ``musefast.cpu.linear.plain()``
each one (packed linears, packed convolutions, the one-pass norms) runs its ordinary PyTorch twin.
It lives in its own module so that the paths share it without importing one another."""
from __future__ import annotations

import threading

SWITCH = threading.local()  # .off: run the plain forwards


def active() -> bool:
    """Whether this thread is inside ``musefast.cpu.linear.plain()``."""
    return getattr(SWITCH, "off", False)
