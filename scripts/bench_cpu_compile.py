"""torch.compile (Inductor's CPU code generation) over aMUSEd's transformer against the CPU
engine's hand-packed path, one forward at B = 2, random weights of the real architecture.

Each configuration is compiled from a fresh model copy without the CPU engine (the compiler plans
its own matrix products), warmed up, then timed interleaved with the packed eager path in one
process. The compile cost (first call, including Inductor's code generation and, under
max-autotune, its GEMM template tuning) is recorded beside each.

    python scripts/bench_cpu_compile.py --size amused-256 --dtype float32 --out result.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

from musefast.cpu import isa, linear as cpu
from musefast.models.uvit import UVit2D, UVit2DConfig

SIZES = {"amused-256": dict(sample_size=16), "amused-512": dict(sample_size=32, downsample=True, upsample=True),
         "reduced": dict(sample_size=16, hidden_size=256, num_attention_heads=4, num_hidden_layers=4,
                         in_channels=128, block_out_channels=128, block_num_heads=4, num_res_blocks=1,
                         intermediate_size=704, cond_embed_dim=256, encoder_hidden_size=256)}
CONFIGS = {  # name -> Inductor options (torch.compile takes options or a mode, not both)
    "inductor_freezing": {"freezing": True},
    "inductor_freezing_cpp_wrapper": {"freezing": True, "cpp_wrapper": True},
    "inductor_max_autotune_freezing": {"freezing": True, "max_autotune": True},
}


def _model(size: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = UVit2D(UVit2DConfig(**SIZES[size])).eval().to(dtype)
    with torch.no_grad():  # norms start at identity: give every parameter a value
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    B, side = 2, cfg.sample_size
    args = (torch.randint(0, cfg.codebook_size, (B, side, side), generator=g),
            torch.randn(B, 77, cfg.encoder_hidden_size, generator=g).to(dtype),
            torch.randn(B, cfg.cond_embed_dim, generator=g).to(dtype),
            torch.tensor([256.0, 256, 0, 0, 6]).expand(B, 5).contiguous())
    return model, args


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.machine())
    except OSError:
        return platform.machine()


def _time(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="amused-256", choices=sorted(SIZES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"error: unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
    dtype = getattr(torch, args.dtype)
    model, inputs = _model(args.size, dtype)
    packed = copy.deepcopy(model)
    cpu.apply(packed)
    report = {"size": args.size, "dtype": args.dtype, "batch": 2, "threads": torch.get_num_threads(),
              "cpu": _cpu_model(), "isa": isa.record(), "torch": torch.__version__,
              "load_before": list(os.getloadavg()), "compile_s": {}, "errors": {}}
    fns = {"musefast_packed": lambda: packed(*inputs)}
    with torch.no_grad():
        want = packed(*inputs).float()
        for name in names:
            torch._dynamo.reset()
            compiled = torch.compile(copy.deepcopy(model), options=CONFIGS[name])
            t0 = time.perf_counter()
            try:
                got = compiled(*inputs).float()
            except Exception as exc:  # noqa: BLE001 — a configuration that fails is a result, recorded
                report["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                continue
            report["compile_s"][name] = time.perf_counter() - t0
            print(f"{name}: first call (compile) {report['compile_s'][name]:.1f} s", flush=True)
            report[f"{name}_rel_err_vs_packed"] = ((got - want).norm() / want.norm()).item()
            fns[name] = lambda c=compiled: c(*inputs)
        for fn in fns.values():
            fn()
        runs = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                runs[name] += _time(fn, 1)
    for name, ts in runs.items():
        report[f"{name}_ms"] = statistics.median(ts)
        report[f"{name}_runs_ms"] = ts
        if name != "musefast_packed":
            report[f"packed_speedup_vs_{name}"] = report[f"{name}_ms"] / report["musefast_packed_ms"]
    report["load_after"] = list(os.getloadavg())
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
