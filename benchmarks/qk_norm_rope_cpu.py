"""ops.qk_norm_rope on CPU vs the unfused PyTorch path it replaced, interleaved in one process.

The unfused anchor is what MeissonicTransformer ran before the op: head-split views of the fused
QKV output, ``F.rms_norm`` per stream in the model's dtype, the rotation in float32 on half-width
tables and back, and ``torch.cat`` of the [text; image] streams. Measured:

1. the q/k norm + RoPE part alone at Meissonic's attention size (8 heads x 128, 77 text + 1024
   image rows; batch 2 = one CFG step): a double-stream block (two streams joined) and a
   single-stream block (one strided stream of the joint sequence);
2. one MeissonicTransformer forward (``--layers`` double + single blocks, default the real 14 +
   28, random weights) on 64x64 tokens, with the blocks' q/k path switched between the two.

Each round times fused and unfused back to back (median of ``--rounds``), so load on a shared
machine hits both alike. Prints one JSON object.
Usage: ``OMP_NUM_THREADS=2 python benchmarks/qk_norm_rope_cpu.py --dtype bf16``
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from musefast import ops
from musefast.models import meissonic
from musefast.models.meissonic import MeissonicConfig, MeissonicTransformer
from musefast.nn.rope import RopeTables

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def unfused_qk_norm_rope(qkv, q_weight, k_weight, cos, sin, *, heads, eps):
    """The pre-op path: views, RMSNorm in the model dtype, rotation in float32, concatenation."""
    qkv, q_weight, k_weight = ([t] if isinstance(t, torch.Tensor) else t for t in (qkv, q_weight, k_weight))
    parts, start = [], 0
    for x, wq, wk in zip(qkv, q_weight, k_weight):
        B, L, width = x.shape
        D = width // (3 * heads)
        q, k, v = x.view(B, L, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)
        c, s = cos[start:start + L], sin[start:start + L]

        def rotate(t):
            t0, t1 = t.float().unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack([t0 * c - t1 * s, t1 * c + t0 * s], dim=-1).flatten(-2).to(t.dtype)

        parts.append((rotate(F.rms_norm(q, (D,), wq, eps)), rotate(F.rms_norm(k, (D,), wk, eps)), v))
        start += L
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(p, dim=2) for p in zip(*parts))


def interleaved(fused, unfused, rounds: int) -> dict:
    fused(), unfused()  # warm-up
    times = {"fused": [], "unfused": []}
    for _ in range(rounds):
        for name, fn in (("fused", fused), ("unfused", unfused)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    f, u = statistics.median(times["fused"]), statistics.median(times["unfused"])
    return {"fused_ms": round(f * 1e3, 3), "unfused_ms": round(u * 1e3, 3), "speedup": round(u / f, 2)}


def part_benchmark(dtype, rounds: int) -> dict:
    B, H, D, text, image = 2, 8, 128, 77, 1024
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(text + image, 3)
    ids[text:, 1], ids[text:, 2] = torch.arange(image) // 32, torch.arange(image) % 32
    tables = RopeTables(ids, (16, 56, 56))
    w = [(1 + 0.1 * torch.randn(D, generator=g)).to(dtype) for _ in range(4)]
    streams = [torch.randn(B, n, 3 * H * D, generator=g).to(dtype) for n in (text, image)]
    joint = torch.randn(B, text + image, 3 * H * D + 4 * H * D, generator=g).to(dtype)[..., : 3 * H * D]
    out = {}
    for label, args in (("double_stream", (streams, w[:2], w[2:])), ("single_stream", (joint, w[0], w[1]))):
        call = lambda fn, a=args: fn(*a, tables.cos, tables.sin, heads=H, eps=1e-6)  # noqa: E731
        out[label] = interleaved(lambda: call(ops.qk_norm_rope), lambda: call(unfused_qk_norm_rope), rounds)
    return out


def forward_benchmark(dtype, layers: tuple[int, int], rounds: int) -> dict:
    torch.manual_seed(0)
    cfg = MeissonicConfig(num_layers=layers[0], num_single_layers=layers[1])
    model = MeissonicTransformer(cfg).to(dtype).eval()
    tokens = torch.randint(0, cfg.codebook_size, (1, 64, 64))
    hidden = torch.randn(1, 77, cfg.joint_attention_dim, dtype=dtype)
    pooled = torch.randn(1, cfg.pooled_projection_dim, dtype=dtype)
    micro = torch.tensor([[1024.0, 1024, 0, 0, 6]], dtype=dtype)
    with torch.no_grad():
        context = model.prepare_context(hidden, pooled, micro)

        def run(fn):
            def call():
                meissonic.qk_norm_rope = fn
                try:
                    return model(tokens, timestep=torch.tensor([47]), context=context)
                finally:
                    meissonic.qk_norm_rope = ops.qk_norm_rope
            return call

        result = interleaved(run(ops.qk_norm_rope), run(unfused_qk_norm_rope), rounds)
        diff = (run(ops.qk_norm_rope)().float() - run(unfused_qk_norm_rope)().float()).abs().max().item()
    return {**result, "layers": list(layers), "max_abs_logit_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--forward-rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, nargs=2, default=(14, 28), metavar=("DOUBLE", "SINGLE"))
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    report = {"dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "norm_rope_part": part_benchmark(dtype, args.rounds),
              "forward": forward_benchmark(dtype, tuple(args.layers), args.forward_rounds)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
