"""Markdown tables of a CPU peer benchmark JSON (``benchmarks/test_bench_cpu_peers.py`` run with
``--benchmark-json``), in the layout of docs/performance.md's CPU section: forwards, end to end with its stages,
text encode, VQ decode.

    python benchmarks/cpu_table.py benchmarks/results/cpu-<date>.json
"""
from __future__ import annotations

import json
import sys

STAGES = ("text", "transformer", "vq_decode", "rest")


def _ms(info: dict, name: str) -> str:
    if f"{name}_ms" not in info:
        return "—"
    lo, hi = info.get(f"{name}_min_max_ms", [None, None])
    spread = f" [{lo:.0f}–{hi:.0f}]" if lo is not None else ""
    rate = f" ({info[f'{name}_gflops']:.0f} GFLOP/s)" if info.get(f"{name}_gflops") else ""
    return f"{info[f'{name}_ms']:.0f} ms{spread}{rate}"


def _names(info: dict) -> list[str]:
    """Implementations in the order they were recorded (musefast first)."""
    return [k[:-3] for k in info if k.endswith("_ms") and not k.endswith("_min_max_ms")
            and not any(k.startswith(f"{s}_") for s in ("rss", "rest"))]


def _speedups(info: dict) -> str:
    return ", ".join(f"{v:.2f}× vs {k.removeprefix('speedup_vs_')}" for k, v in info.items() if k.startswith("speedup_vs_"))


def _simple(title: str, runs: list[dict], label) -> list[str]:
    names = list(dict.fromkeys(n for info in runs for n in _names(info)))
    out = [f"| {title} | " + " | ".join(names) + " | speedup | threads | peak RSS |",
           "|---" * (len(names) + 4) + "|"]
    for info in runs:
        out.append(f"| {label(info)} | " + " | ".join(_ms(info, n) for n in names)
                   + f" | {_speedups(info)} | {info.get('threads')} | {info.get('peak_rss_gib', 0):.1f} GiB |")
    return out


def _stages(info: dict) -> list[str]:
    out = ["| end to end, 12 steps | total | " + " | ".join(f"{s} ms" for s in STAGES) + " | calls |",
           "|---" * (len(STAGES) + 3) + "|"]
    for name in _names(info):
        st = info.get(f"{name}_stages", {})
        cells = []
        for s in STAGES:
            ms = st.get(f"{s}_ms")
            rate = st.get(f"{s}_gflops")
            cells.append("—" if ms is None else f"{ms:.0f}" + (f" ({rate:.0f} GFLOP/s)" if rate else ""))
        calls = ", ".join(f"{k} {v}" for k, v in st.get("calls", {}).items())
        out.append(f"| {name} | {_ms(info, name)} | " + " | ".join(cells) + f" | {calls} |")
    out.append(f"\nthreads {info.get('threads')}, rounds {info.get('rounds')}, musefast dtype "
               f"{info.get('musefast_auto_dtype')}, process peak RSS {info.get('peak_rss_gib', 0):.1f} GiB; "
               f"{_speedups(info)}")
    return out


def isa_line(info: dict) -> str:
    """On which CPU a result was measured: model, the flags that matter, the caps in effect and
    musefast's CPU path, and the machine's 1-minute load before and after (results of older runs
    recorded none: "ISA not recorded")."""
    isa = info.get("isa")
    if not isa:
        return "ISA not recorded"
    caps = ", ".join(f"{k}={isa[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if isa.get(k))
    load = ""
    if info.get("load_before") and info.get("load_after"):
        load = f"; load {info['load_before'][0]:.1f} -> {info['load_after'][0]:.1f}"
    return (f"{isa.get('cpu_model')} ({' '.join(isa.get('flags', []))}); {caps or 'no ISA cap'}, "
            f"ATen {isa.get('ATEN_CPU_CAPABILITY')}; musefast CPU path {isa.get('musefast_cpu_path')}{load}")


def tables(data: dict) -> list[str]:
    meta = data.get("musefast", {})
    out = [f"device: {meta.get('device')}, torch {meta.get('torch')}, commit {str(meta.get('commit'))[:10]}, "
           f"{meta.get('date')}"]
    out += [f"measured on: {line}" for line in
            dict.fromkeys(isa_line(b["extra_info"]).split("; load")[0] for b in data["benchmarks"])]
    groups: dict[str, list[dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["name"].split("[")[0], []).append(b["extra_info"])
    titled = {"test_cpu_forward": ("B = 2 forward", lambda i: f"{i.get('size')} {i.get('dtype')}"),
              "test_cpu_text_encode": ("text encode", lambda i: f"{i.get('size')} {i.get('dtype')}"),
              "test_cpu_vq_decode": ("VQ decode", lambda i: f"{i.get('size')} {i.get('grid')}×{i.get('grid')}")}
    for test, runs in groups.items():
        out.append("")
        loads = [isa_line(i).split("; load ")[1] for i in runs if "; load " in isa_line(i)]
        out += [f"{test}: load (1 min) " + ", ".join(loads)] if loads else []
        if test == "test_cpu_end_to_end":
            for info in runs:
                out += _stages(info)
        elif test in titled:
            out += _simple(*titled[test][:1], runs, titled[test][1])
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print("\n".join(tables(json.load(open(path)))))
