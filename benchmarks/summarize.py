"""Markdown table of a pytest-benchmark JSON (``--benchmark-json``): time, anchors, ratios.

    python benchmarks/summarize.py benchmarks/results/cpu-2026-11-22.json
"""
from __future__ import annotations

import json
import sys


def rows(data: dict) -> list[str]:
    meta = data.get("musefast", {})
    out = [f"device: {meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
           f"threads {meta.get('cpu_threads')}, commit {str(meta.get('commit'))[:10]}, {meta.get('date')}", "",
           "| benchmark | musefast ms | anchors (ms) | speedup | throughput |", "|---|---|---|---|---|"]
    for b in data["benchmarks"]:
        info = b["extra_info"]
        ms = info.get("musefast_ms", info.get("total_ms"))
        anchors = ", ".join(f"{k[:-3]} {v:.2f}" for k, v in info.items()
                            if k.endswith("_ms") and k not in ("musefast_ms", "total_ms") and "speedup" not in k)
        speed = ", ".join(f"{v:.1f}× vs {k[len('speedup_vs_'):]}" for k, v in info.items() if k.startswith("speedup_vs_"))
        thr = []
        for key, unit in (("tflops", "TFLOP/s"), ("gbps", "GB/s"), ("pct_peak_flops", "% peak"), ("pct_peak_hbm", "% HBM")):
            if key in info:
                thr.append(f"{info[key]:.3g} {unit}")
        out.append(f"| {b['name']} | {ms:.2f} | {anchors} | {speed} | {', '.join(thr)} |" if ms is not None
                   else f"| {b['name']} | | {anchors} | {speed} | |")
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print("\n".join(rows(json.load(open(path)))))
