"""How a Triton kernel of musefast gets its launch config: autotuned, or one pinned config.

- Under ``TRITON_INTERPRET=1`` (CPU tests): one config chosen for the interpreter, which would
  otherwise run every candidate.
- With ``MUSEFAST_TRITON_FIXED_CONFIG=1``: one config per kernel, valid for every shape the
  kernel accepts. Correctness runs (the GPU test suite) and every step of
  ``scripts/gpu_check.py`` (self-test and timings included: its figures are the pinned
  config's, and its report says so) then compile each kernel once per specialisation instead
  of once per candidate config and spend no time timing candidates: a short GPU run fits its
  budget. Another config can round differently (attention folds keys in BLOCK_N tiles) but
  must meet the same tolerances.
- Otherwise (benchmarks, users): ``triton.autotune`` over the kernel's candidates.

Both variables are read once, when the kernel module is imported. (The remask kernel has no
autotuning: its blocks follow K, see kernels/remask.py `_blocks`.)
"""
from __future__ import annotations

import os

import triton


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fixed_config_requested() -> bool:
    return os.environ.get("MUSEFAST_TRITON_FIXED_CONFIG") == "1"


def launcher(kernel, *, configs: list, pinned: triton.Config, interpreter: dict, **autotune_kwargs):
    """(callable kernel, extra launch kwargs) for this process's mode (see the module doc)."""
    if interpret_mode():
        return kernel, dict(interpreter)
    if fixed_config_requested():
        return kernel, dict(pinned.kwargs, num_warps=pinned.num_warps, num_stages=pinned.num_stages)
    return triton.autotune(configs=configs, **autotune_kwargs)(kernel), {}
