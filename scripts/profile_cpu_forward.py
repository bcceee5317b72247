#!/usr/bin/env python
"""Where one aMUSEd transformer forward spends its time on a CPU, per op class (torch.profiler):
musefast's UVit2D with the CPU engine (fp32 and bf16) and without it, random weights, B = 2.

    OMP_NUM_THREADS=2 python scripts/profile_cpu_forward.py --size amused-256 -o profile.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

CLASSES = [  # (class, substrings of aten/mkldnn op names), first match wins
    ("linear (oneDNN packed)", ("mkldnn::_linear_pointwise",)),
    # batched products are attention's in these models (the CPU `bmm` attention backend)
    ("attention", ("scaled_dot_product", "flash_attention", "_softmax", "aten::baddbmm", "aten::bmm")),
    ("linear (MKL/aten)", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul")),
    ("convolution", ("convolution", "conv2d", "conv_transpose", "mkldnn_convolution")),
    ("norms", ("rms_norm", "layer_norm", "norm", "rsqrt")),  # musefast::rms_norm_modulate included
    ("elementwise", ("aten::mul", "aten::add", "aten::gelu", "aten::silu", "aten::div", "aten::sub", "aten::pow",
                     "aten::mean", "aten::sum", "aten::where")),
    ("copies / layout", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::to", "aten::_to_copy",
                         "aten::permute", "aten::reshape", "aten::view", "aten::transpose", "aten::embedding")),
]


def op_class(name: str) -> str:
    for label, keys in CLASSES:
        if any(k in name for k in keys):
            return label
    return "other"


def profile(run, repeats: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    run()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    per_class = defaultdict(float)
    for evt in prof.key_averages():  # self time: each microsecond is counted once
        per_class[op_class(evt.key)] += evt.self_cpu_time_total / 1e3 / repeats
    total = sum(per_class.values())
    return {k: {"ms": round(v, 1), "share": round(v / total, 3)} for k, v in sorted(per_class.items(),
                                                                                    key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="amused-256", choices=["amused-256", "amused-512", "reduced"])
    p.add_argument("-o", "--output", default=None)
    args = p.parse_args(argv)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from test_bench_cpu_peers import _UVIT  # one place for the architectures

    from musefast.cpu import linear as cpu
    from musefast.models.uvit import UVit2D, UVit2DConfig

    torch.manual_seed(0)
    cfg = UVit2DConfig(**_UVIT[args.size])
    model = UVit2D(cfg).eval()
    B, side = 2, cfg.sample_size
    tokens = torch.randint(0, cfg.codebook_size, (B, side, side))
    hidden, pooled = torch.randn(B, 77, cfg.encoder_hidden_size), torch.randn(B, cfg.cond_embed_dim)
    micro = torch.tensor([256.0, 256, 0, 0, 6])
    report = {"size": args.size, "threads": torch.get_num_threads()}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            cpu.apply(model, release=False)  # the profiled plain twin needs its plain weights, not rebuilt per call
            ctx = model.prepare_context(hidden.to(dtype), pooled.to(dtype), micro)
            name = str(dtype).removeprefix("torch.")
            report[f"engine {name}"] = profile(lambda: model(tokens, context=ctx))

            def plain():
                with cpu.plain():
                    model(tokens, context=ctx)

            report[f"plain {name}"] = profile(plain)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
