#!/usr/bin/env python
"""Render the committed benchmark results to the PNGs the docs show (docs/img/).

    pip install -e ".[docs]"        # matplotlib
    python benchmarks/plot.py       # rewrites docs/img/*.png from the committed JSON files

Each figure names its result files and conditions in its title, so a PNG never outlives the
numbers it came from: re-run this after committing new results.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The CPU comparison: forward passes at both aMUSEd sizes and one end-to-end run, same quiet machine.
CPU_FORWARD = ("cpu-2026-12-02-amused256-quiet.json", "cpu-2026-12-02-amused512-quiet.json")
CPU_END_TO_END = "cpu-2026-12-02-amused256-e2e-fp32-quiet.json"
STEP_CACHE = ROOT / "docs" / "step_cache_eval.json"
BATCH = ("batch-cpu-2026-12-02.json", "batch-cpu-2026-12-02-2threads.json")
SERVER_LOAD = "server-load-cpu-2026-12-08.json"
COLOURS = {"musefast": "#d9480f", "musefast plain": "#f4a582", "OpenVINO": "#2166ac", "diffusers": "#7f7f7f"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _extra(results: dict, name: str) -> dict:
    return next(b["extra_info"] for b in results["benchmarks"] if b["name"] == name)


def _bar(ax, x, ms, span, colour, label, width):
    """One bar with its min–max spread as an error bar (when the run recorded one)."""
    err = None if span is None else [[(ms - span[0]) / 1000], [(span[1] - ms) / 1000]]
    ax.bar(x, ms / 1000, width, color=colour, label=label, yerr=err, capsize=2)


def cpu_latency(plt, out: Path) -> Path:
    fig, (fwd, e2e) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    peers = (("musefast", "musefast"), ("musefast_plain", "musefast plain"), ("openvino", "OpenVINO"),
             ("diffusers", "diffusers"))
    labels = []
    for i, (size, dtype) in enumerate([(s, d) for s in ("256", "512") for d in ("float32", "bfloat16")]):
        extra = _extra(_load(RESULTS / CPU_FORWARD[int(size == "512")]), f"test_cpu_forward[amused-{size}-{dtype}]")
        for j, (key, label) in enumerate(peers):
            _bar(fwd, i + (j - 1.5) * 0.2, extra[f"{key}_ms"], extra.get(f"{key}_min_max_ms"), COLOURS[label],
                 label if i == 0 else None, 0.2)
        labels.append(f"aMUSEd-{size}\n{'fp32' if dtype == 'float32' else 'bf16'}")
    fwd.set_xticks(range(len(labels)), labels)
    fwd.set_ylabel("seconds (lower is better)")
    fwd.set_title("transformer forward, batch 2", fontsize=10)
    fwd.legend(fontsize=8, frameon=False)

    extra = _extra(_load(RESULTS / CPU_END_TO_END), "test_cpu_end_to_end")
    runs = (("musefast", "musefast\nauto (bf16)", "musefast"), ("musefast_fp32", "musefast\nfp32", "musefast"),
            ("openvino_bf16", "OpenVINO\nbf16", "OpenVINO"), ("openvino_f32", "OpenVINO\nf32", "OpenVINO"),
            ("diffusers_fp32", "diffusers\nfp32", "diffusers"))
    for i, (key, _, colour) in enumerate(runs):
        _bar(e2e, i, extra[f"{key}_ms"], extra.get(f"{key}_min_max_ms"), COLOURS[colour], None, 0.6)
    e2e.set_xticks(range(len(runs)), [label for _, label, _ in runs], fontsize=8)
    e2e.set_title("aMUSEd-256 text to image, 12 steps, batch 1", fontsize=10)
    fig.suptitle("CPU: 2-core AMD EPYC (AVX512-BF16, VNNI), 2 threads, random weights, median and min–max "
                 "of 3 rounds (2 at 512)", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "cpu-latency.png")


def step_cache(plt, out: Path) -> Path:
    demo = _load(STEP_CACHE)["demo"]
    settings = demo["settings"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    exact = settings["exact"]["transformer_gflops_per_image"]
    for name, s in settings.items():
        reduction = exact / s["transformer_gflops_per_image"]
        fast = name == "r3-masked+interval"
        ax.scatter(reduction, s["shape"], s=40 if fast else 18,
                   color=COLOURS["musefast"] if fast else COLOURS["OpenVINO"], zorder=3)
        if name in ("exact", "r3-masked+interval", "r3-lowconf0.25", "r4-lowconf0.1+interval", "r2-lowconf0.5"):
            ax.annotate('"fast"' if fast else name, (reduction, s["shape"]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    ax.axhline(settings["exact"]["shape"] - 0.01, color="#999999", lw=0.8, ls="--")
    ax.text(1.0, settings["exact"]["shape"] - 0.009, "exact − 1 point", fontsize=7, color="#666666")
    ax.set_xlim(0.9, 4.3)
    ax.set_xlabel("transformer FLOP reduction vs exact decoding (×)")
    ax.set_ylabel("shape accuracy (exact checker)")
    ax.set_title(f"Step cache on the demo model: {demo['count']} held-out captions, {demo['num_steps']} steps, "
                 f"guidance {demo['guidance_scale']}", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "step-cache.png")


def batch_throughput(plt, out: Path) -> Path:
    runs = [_load(RESULTS / name) for name in BATCH]
    kinds = (("in_process", "in-process"), ("ray_1_actor", "Ray, 1 actor × 2 threads"),
             ("ray_2_actor", "Ray, 2 actors × 1 thread"))
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for j, run in enumerate(runs):
        label = f"run {'AB'[j]}: in-process on {run['threads']} thread{'s' if run['threads'] > 1 else ''}, " \
                f"load average {run['load_average_at_start']:.0f} at start"
        values = [run[key]["images_per_s"] for key, _ in kinds]
        ax.bar([i + (j - 0.5) * 0.35 for i in range(len(kinds))], values, 0.35, label=label,
               color=(COLOURS["musefast"], COLOURS["OpenVINO"])[j])
    ax.set_xticks(range(len(kinds)), [name for _, name in kinds])
    ax.set_ylabel("images/s (higher is better)")
    ax.set_title(f"musefast batch, demo model, {runs[0]['rows']} rows, 12 steps, batch 8, 2-core CPU", fontsize=9)
    ax.set_ylim(0, max(run[key]["images_per_s"] for run in runs for key, _ in kinds) * 1.35)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    fig.tight_layout()
    return _save(fig, out / "batch-throughput.png")


def server_load(plt, out: Path) -> Path:
    """Throughput and latency percentiles of the batched server vs --max-batch 1, per model."""
    results = _load(RESULTS / SERVER_LOAD)
    runs = [b["extra_info"] for b in results["benchmarks"]]
    settings = (("server", "continuous batching", COLOURS["musefast"]),
                ("server_max_batch_1", "--max-batch 1", COLOURS["diffusers"]))
    stats = (("p50_s", "p50"), ("p95_s", "p95"), ("p99_s", "p99"), ("first_preview_p50_s", "first\npreview p50"))
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs), 6.2), squeeze=False)
    for column, run in enumerate(runs):
        name = "demo" if run["model"] == "demo" else "aMUSEd-256, random weights"
        loads = run["load_average_1min"] + [v for key, _, _ in settings for r in run[key].get("rounds", [])
                                            for v in r["load_average_1min"]]
        title = (f"{name}, {run['steps']} steps\n{run['clients']} clients, {run['requests']} requests × "
                 f"{run.get('rounds', 1)} passes, load average {min(loads):.1f}–{max(loads):.1f}")
        rate, latency = axes[0][column], axes[1][column]
        for j, (key, label, colour) in enumerate(settings):
            value = run[key]["images_per_s"]
            rate.bar(j, value, 0.6, color=colour, label=label)
            rate.annotate(f"{value:.3g}", (j, value), ha="center", va="bottom", fontsize=8)
            latency.bar([i + (j - 0.5) * 0.38 for i in range(len(stats))], [run[key][s] for s, _ in stats], 0.38,
                        color=colour, label=label)
        rate.set_xticks(range(len(settings)), [label for _, label, _ in settings])
        rate.set_ylim(0, max(run[key]["images_per_s"] for key, _, _ in settings) * 1.15)
        rate.set_ylabel("images/s (higher is better)")
        rate.set_title(title, fontsize=8)
        latency.set_xticks(range(len(stats)), [label for _, label in stats])
        latency.set_ylabel("seconds (lower is better)")
        latency.set_ylim(0, max(run[key][s] for key, _, _ in settings for s, _ in stats) * 1.3)
        latency.legend(fontsize=8, frameon=False, loc="upper left")
    fig.suptitle("musefast serve on a 2-core CPU: openai SDK clients streaming with partial_images=1 "
                 f"({SERVER_LOAD})", fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "server-load.png")


def _save(fig, path: Path) -> Path:
    # A fixed timestamp-free PNG: re-rendering unchanged results leaves the file unchanged.
    fig.savefig(path, dpi=100, metadata={"Software": None})
    fig.clf()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the PNGs (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("benchmarks/plot.py needs matplotlib: pip install -e \".[docs]\"") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for render in (cpu_latency, step_cache, batch_throughput, server_load):
        path = render(plt, out)
        print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
