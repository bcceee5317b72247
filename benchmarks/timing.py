"""Timing and roofline functions shared by the benchmark suites (every result is a ratio to an anchor timed in the same run).

On CUDA: warm-up, then CUDA events around a loop of calls, one synchronize at the end; on
CPU: perf_counter around a loop. Each benchmark times musefast with pytest-benchmark and its
anchor with :func:`seconds_per_call` in the same run, and records the ratio.
"""
from __future__ import annotations

import time

import torch

# Dense peaks by device-name substring: (fp16/bf16 tensor TFLOP/s, fp32 TFLOP/s, HBM TB/s).
PEAKS = {
    "H200": (989.0, 67.0, 4.8),
    "H100": (989.0, 67.0, 3.35),
    "A100": (312.0, 19.5, 2.0),
    "L40S": (362.0, 91.6, 0.864),
    "A10": (125.0, 31.2, 0.6),
}


def device_peaks() -> tuple[float, float, float] | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return None


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synced(fn, device):
    """fn followed by one synchronize: what pytest-benchmark should time on a GPU."""
    if torch.device(device).type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def seconds_per_call(fn, device, *, min_seconds: float = 0.2, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    iters, elapsed = 1, 0.0
    while True:
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds or iters >= 1 << 14:
            return elapsed / iters
        iters *= 2


def bench(benchmark, fn, device, *, rounds: int = 5):
    """Time fn with pytest-benchmark; returns the mean seconds per call."""
    fn = synced(fn, device)
    estimate = seconds_per_call(fn, device, min_seconds=0.02, warmup=1)
    per_round = max(1, int(0.05 / max(estimate, 1e-7)))
    benchmark.pedantic(fn, rounds=rounds, iterations=per_round, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    return stats.stats.mean if stats else estimate  # None under --benchmark-disable


def record(benchmark, *, seconds: float, anchors: dict[str, float], flops: float = 0.0,
           bytes_moved: float = 0.0, tensor_cores: bool = True) -> None:
    """Store ratios against each anchor and achieved throughput (with % of peak on a GPU)."""
    info = benchmark.extra_info
    info["musefast_ms"] = seconds * 1e3
    for name, anchor_seconds in anchors.items():
        info[f"{name}_ms"] = anchor_seconds * 1e3
        info[f"speedup_vs_{name}"] = anchor_seconds / seconds
    peaks = device_peaks()
    if flops:
        info["tflops"] = flops / seconds / 1e12
        if peaks:
            info["pct_peak_flops"] = 100 * info["tflops"] / (peaks[0] if tensor_cores else peaks[1])
    if bytes_moved:
        info["gbps"] = bytes_moved / seconds / 1e9
        if peaks:
            info["pct_peak_hbm"] = 100 * info["gbps"] / (peaks[2] * 1e3)
