"""Meissonic's step cache on CPU: exact vs cache settings at the real token grid, reduced width.

A random :class:`MeissonicTransformer` with Meissonic's grid (1024² -> 64x64 tokens -> 32x32 cells
after the 2x down-sampling), text length (77) and codebook (8192), but fewer and narrower blocks
(``--heads`` x 128 wide, ``--double`` + ``--single`` blocks), generates from random text
embeddings with the fused sampler. Per setting: transformer FLOPs per image (torch's
FlopCounterMode on the plain linears and the reference attention), the share of the 2x2 cells a
cheap step recomputes, token agreement with exact, and wall time per image in interleaved rounds
(exact first in each round). The FLOP count runs once, outside the timed rounds.

    OMP_NUM_THREADS=2 python scripts/bench_meissonic_cache.py --steps 16 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from musefast import StepCache
from musefast.cpu import linear as cpu_engine
from musefast.models.meissonic import MeissonicConfig, MeissonicTransformer
from musefast.models.uvit import UVit2D
from musefast.models.vqgan import VQGAN, VQGANConfig
from musefast.pipelines.meissonic import TEXT_LENGTH, MeissonicPipeline

SETTINGS = {
    "exact": dict(),
    "interval (0, 0.5)": dict(guidance_interval=(0.0, 0.5)),
    "refresh 3, masked": dict(cache=StepCache(refresh=3)),
    "fast": dict(cache="fast"),
    "refresh 3, lowest_confidence 0.25 + interval": dict(
        cache=StepCache(refresh=3, recompute="lowest_confidence", fraction=0.25, guidance_interval=(0.0, 0.5))),
}


def build(heads: int, double: int, single: int, seed: int) -> MeissonicPipeline:
    torch.manual_seed(seed)
    d = heads * 128
    cfg = MeissonicConfig(num_layers=double, num_single_layers=single, num_attention_heads=heads,
                          joint_attention_dim=d, pooled_projection_dim=d)
    transformer = MeissonicTransformer(cfg).eval()  # torch's default init: every linear random, norms at 1
    cpu_engine.apply_default(transformer)
    vq = VQGAN(VQGANConfig(channels=8, channel_mult=(1,), num_res_blocks=0, num_mid_blocks=0, z_channels=4,
                           embed_dim=4, norm_groups=4, patch_size=16, codebook_size=cfg.codebook_size))
    return MeissonicPipeline(vq, None, transformer)


class CellCounter:
    """Shares of the transformer grid's cells recomputed by the cheap forwards (rows= calls)."""

    def __init__(self, model: MeissonicTransformer):
        self.shares: list[float] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        rows = kwargs.get("rows")
        if rows is not None:
            tokens = args[0]
            inner = (tokens.shape[1] // 2, tokens.shape[2] // 2) if module.config.downsample else tokens.shape[1:]
            cells = UVit2D._inner_rows(rows, tokens.shape[1:], inner)
            self.shares.append(float(torch.tensor([c.unique().numel() for c in cells]).float().mean())
                               / (inner[0] * inner[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--guidance", type=float, default=9.0)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    pipe = build(args.heads, args.double, args.single, seed=0)
    cfg = pipe.transformer.config
    gen = torch.Generator().manual_seed(1)
    embeds = dict(encoder_hidden_states=torch.randn(1, TEXT_LENGTH, cfg.joint_attention_dim, generator=gen),
                  prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
                  negative_encoder_hidden_states=torch.randn(1, TEXT_LENGTH, cfg.joint_attention_dim, generator=gen),
                  negative_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=gen))
    run = dict(embeds, height=args.size, width=args.size, num_inference_steps=args.steps,
               guidance_scale=args.guidance, seed=0, output_type="tokens", progress=False)
    print(f"threads {torch.get_num_threads()}, width {cfg.inner_dim}, blocks {cfg.num_layers}+{cfg.num_single_layers}"
          f", {args.size}² ({args.size // 16}² tokens), {args.steps} steps", flush=True)

    results = {}
    for name, kw in SETTINGS.items():  # FLOPs, cells and tokens: one counted call per setting
        counter = CellCounter(pipe.transformer)
        pipe.transformer.set_backend("reference")
        with cpu_engine.plain(), FlopCounterMode(display=False) as flops:
            tokens = pipe(**run, **kw)
        pipe.transformer.set_backend(None)
        counter.handle.remove()
        gflops = sum(flops.get_flop_counts()["MeissonicTransformer"].values()) / 1e9
        results[name] = dict(gflop_per_image=gflops, tokens=tokens, seconds=[],
                             cheap_cell_share=sum(counter.shares) / len(counter.shares) if counter.shares else None)
    for r in range(args.rounds):  # wall time, settings interleaved
        for name, kw in SETTINGS.items():
            start = time.perf_counter()
            pipe(**run, **kw)
            results[name]["seconds"].append(time.perf_counter() - start)
            print(f"round {r} {name}: {results[name]['seconds'][-1]:.1f} s", flush=True)

    exact = results["exact"]
    exact_tokens = exact["tokens"]
    lines = ["| setting | GFLOP/img | FLOP reduction | cells per cheap step | token agreement | s/img per round | "
             "speedup per round |", "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        res["flop_reduction"] = exact["gflop_per_image"] / res["gflop_per_image"]
        res["token_agreement"] = float((res.pop("tokens") == exact_tokens).float().mean())
        res["speedup"] = [e / s for e, s in zip(exact["seconds"], res["seconds"])]
        share = "—" if res["cheap_cell_share"] is None else f"{res['cheap_cell_share']:.2f}"
        lines.append(f"| {name} | {res['gflop_per_image']:.1f} | {res['flop_reduction']:.2f}x | {share} | "
                     f"{res['token_agreement']:.3f} | {', '.join(f'{s:.1f}' for s in res['seconds'])} | "
                     f"{', '.join(f'{s:.2f}x' for s in res['speedup'])} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), threads=torch.get_num_threads(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
