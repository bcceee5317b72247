"""Learning-rate schedule shared by the training stages."""
from __future__ import annotations

import math


def warmup_cosine_lr(step: int, steps: int, lr: float, *, warmup: int = 0, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``floor · lr`` at
    the last step."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - 1 - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
