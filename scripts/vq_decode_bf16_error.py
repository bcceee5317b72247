"""How far a bf16 VQ decode moves pixels, against the project's error rule.

The rule (for any fast path): its error against the float32 reference must be at most twice the
error of PyTorch computing the same thing in the same dtype. Here the reference is the plain
float32 decode (NCHW, torch's conv2d); "PyTorch bf16" is the same decoder with every weight and
activation in bf16 through torch's own ops; "musefast bf16" is the CPU path's bf16 decode
(packed oneDNN bf16 convolutions, channels-last bf16 activations, norms with float32 parameters).
Pixels are in [0, 1]. Models: the embedded demo model's tokenizer on the tokens of its own
generations, and aMUSEd's VQ architecture (random weights) on random tokens.

    python scripts/vq_decode_bf16_error.py --out benchmarks/results/vq-bf16-error-<date>.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform

import torch

import musefast
from musefast.cpu import conv as cpu_conv, isa
from musefast.models.vqgan import VQGAN
from musefast.models.vqmodel import vqgan_config_from_diffusers


def _amused_vq() -> VQGAN:
    levels = 5
    config = vqgan_config_from_diffusers(dict(
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=64, num_vq_embeddings=8192, norm_num_groups=32, mid_block_add_attention=False,
        lookup_from_codebook=True, block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2))
    torch.manual_seed(0)
    vq = VQGAN(config).eval()
    with torch.no_grad():  # norms start at identity: give every parameter a value
        for p in vq.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vq


def _errors(vq: VQGAN, tokens: torch.Tensor) -> dict:
    plain = copy.deepcopy(vq)
    cpu_conv.remove(plain)
    want = plain.decode(tokens)
    torch_bf16 = copy.deepcopy(plain).to(torch.bfloat16)
    torch_bf16.config = copy.copy(torch_bf16.config)
    object.__setattr__(torch_bf16.config, "force_upcast", False)  # compute in bf16, not float32 copies
    ours, ours32 = copy.deepcopy(vq), copy.deepcopy(vq)
    cpu_conv.apply(ours, dtype=torch.bfloat16)
    cpu_conv.apply(ours32)
    out = {}
    for name, got in (("pytorch_bf16", torch_bf16.decode(tokens).float()), ("musefast_bf16", ours.decode(tokens)),
                      ("musefast_fp32", ours32.decode(tokens))):
        err = (got - want).abs()
        out[name] = {"max_abs": err.max().item(), "mean_abs": err.mean().item()}
    out["ratio_mean"] = out["musefast_bf16"]["mean_abs"] / out["pytorch_bf16"]["mean_abs"]
    out["ratio_max"] = out["musefast_bf16"]["max_abs"] / out["pytorch_bf16"]["max_abs"]
    out["within_rule"] = out["ratio_mean"] <= 2 and out["ratio_max"] <= 2
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--demo-images", type=int, default=16)
    args = ap.parse_args(argv)
    if not isa.effective()["bf16_packs"]:
        raise SystemExit("error: oneDNN has no bf16 convolutions on this CPU (needs AVX-512); nothing to measure")
    report = {"cpu": platform.processor() or platform.machine(), "isa": isa.record(), "torch": torch.__version__,
              "load": list(os.getloadavg())}
    with torch.no_grad():
        pipe = musefast.load("demo")
        captions = ["a red circle on the left", "a blue square on the left of a green triangle", "a yellow diamond at the top"]
        prompts = [captions[i % len(captions)] for i in range(args.demo_images)]
        tokens = pipe(prompts, seed=0, output_type="tokens", progress=False)
        report["demo"] = {"images": len(prompts), **_errors(pipe.vqgan, tokens)}
        vq = _amused_vq()
        grid = torch.randint(0, 8192, (1, 16, 16), generator=torch.Generator().manual_seed(1))
        report["amused_vq_random_weights_16x16"] = _errors(vq, grid)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
