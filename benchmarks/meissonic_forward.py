"""Meissonic at its real size on CPU: one transformer forward, musefast vs the peer, in one run.

The peer (viiika/Meissonic ``src/``) runs only on diffusers 0.32.x, so it runs in its own
environment (``--peer-python``, ``--peer-src``) as a subprocess of this script:

1. peer process: builds the peer's ``Transformer2DModel`` with MeissonFlow/Meissonic's config
   (14 double + 28 single blocks, 1024 wide) directly in bf16 with random weights, saves it with
   its ``save_pretrained`` (the folder musefast then loads with one call), makes seeded inputs at
   1024² (64x64 tokens, half masked; 77 text tokens), times its forward, stores its logits;
2. this process (musefast): ``MeissonicTransformer.from_pretrained(folder)`` (bf16, the file's
   dtype), the same forward on the same inputs, timed, and its logits compared with the peer's;
3. the per-step sampling work at real size: the fused ``cfg_sample_remask`` on the 2 x 4096 x 8192
   logits of one image under CFG vs the peer scheduler's step (reproduced op for op by
   ``AmusedCompatSampler``), and ``vq_nearest`` at 4096 latents x 8192 codes x 64 vs
   cdist + argmin; with ``--vq-decode`` also the 64x64-token VQ decode to 1024² pixels (the
   real VQ architecture, fp32, random weights).

Every stage records seconds per call (median of ``--repeats`` after one warm-up) and the
process's peak resident memory. Writes one JSON file (``--out``). Batch 1, no CFG batching in
the forward (the pipeline runs cond + uncond as batch 2: twice the work).
Usage::

    python benchmarks/meissonic_forward.py --out benchmarks/results/meissonic-cpu.json \\
        --peer-python /work/venvs/meissonic-peer/bin/python --peer-src <meissonic checkout>
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REAL = dict(patch_size=1, in_channels=64, num_layers=14, num_single_layers=28, attention_head_dim=128,
            num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=1024, guidance_embeds=False,
            axes_dims_rope=[16, 56, 56], vocab_size=8256, codebook_size=8192, downsample=True, upsample=True)
REDUCED = dict(REAL, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
               joint_attention_dim=128, pooled_projection_dim=128, axes_dims_rope=[8, 12, 12])
GRID, TEXT_LEN, TIMESTEP = 64, 77, 47


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds per call after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(-1, 3)


# -- the peer's side (runs in the peer's environment; no musefast import) ------------------------


def peer_main(args) -> None:
    sys.path.insert(0, args.peer_src)
    from safetensors.torch import save_file
    from src.transformer import Transformer2DModel

    torch.set_num_threads(args.threads)
    config = REDUCED if args.reduced else REAL
    folder = Path(args.folder)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: an fp32 copy of 1 B parameters would need 4 GB
    model = Transformer2DModel(**config).eval()
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder / "transformer")
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 8192, (1, GRID, GRID), generator=gen)
    tokens[torch.rand(1, GRID, GRID, generator=gen) < 0.5] = 8255
    text_width = config["joint_attention_dim"]
    inputs = dict(tokens=tokens,
                  encoder_hidden_states=torch.randn(1, TEXT_LEN, text_width, generator=gen).bfloat16(),
                  pooled_text_emb=torch.randn(1, config["pooled_projection_dim"], generator=gen).bfloat16(),
                  micro_conds=torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0]]).bfloat16(),
                  timestep=torch.tensor([TIMESTEP]))
    save_file(inputs, folder / "inputs.safetensors")

    def forward():
        with torch.no_grad():
            return model(hidden_states=inputs["tokens"], encoder_hidden_states=inputs["encoder_hidden_states"],
                         pooled_projections=inputs["pooled_text_emb"], timestep=inputs["timestep"],
                         img_ids=image_ids(GRID // 2, GRID // 2), txt_ids=torch.zeros(TEXT_LEN, 3),
                         micro_conds=inputs["micro_conds"])

    seconds, logits = timed(forward, args.repeats)
    save_file({"logits": logits.contiguous()}, folder / "peer_logits.safetensors")
    import diffusers

    result = dict(seconds=seconds, peak_rss_mb=peak_rss_mb(), diffusers=diffusers.__version__,
                  parameters=sum(p.numel() for p in model.parameters()))
    (folder / "peer.json").write_text(json.dumps(result))


# -- musefast's side ------------------------------------------------------------------------------


def musefast_forward(args, folder: Path) -> dict:
    from safetensors.torch import load_file

    from musefast.models.meissonic import MeissonicTransformer

    start = time.perf_counter()
    model = MeissonicTransformer.from_pretrained(folder / "transformer")
    load_seconds = time.perf_counter() - start
    inputs = load_file(folder / "inputs.safetensors")
    context = model.prepare_context(inputs["encoder_hidden_states"], inputs["pooled_text_emb"], inputs["micro_conds"])

    def forward():
        with torch.no_grad():
            return model(inputs["tokens"], timestep=inputs["timestep"], context=context)

    seconds, logits = timed(forward, args.repeats)
    peer = load_file(folder / "peer_logits.safetensors")["logits"].float()
    diff = (logits.float() - peer).abs()
    same_argmax = (logits.float().argmax(1) == peer.argmax(1)).float().mean().item()
    return dict(seconds=seconds, load_seconds=load_seconds, dtype=str(model.dtype),
                parameters=sum(p.numel() for p in model.parameters()),
                weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                logits_max_abs_diff_vs_peer=diff.max().item(), logits_mean_abs_diff_vs_peer=diff.mean().item(),
                peer_logits_max_abs=peer.abs().max().item(), argmax_agreement_vs_peer=same_argmax)


def sampling_step(args) -> dict:
    """The per-step sampling work of one 1024² image under CFG: 2 x 4096 x 8192 logits."""
    from musefast import ops
    from musefast.compat.amused_scheduler import AmusedCompatSampler

    N, K, mask_id = GRID * GRID, 8192, 8255
    gen = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(1, N, K, generator=gen), torch.randn(1, N, K, generator=gen)
    tokens = torch.full((1, N), mask_id)
    masked = torch.ones(1, N, dtype=torch.bool)
    steps, guidance = 48, 9.0
    sampler = AmusedCompatSampler(steps, mask_token_id=mask_id)
    num_to_mask = torch.tensor([int(N * torch.cos(torch.tensor(torch.pi / 2 / steps)).item())])

    def fused():
        return ops.cfg_sample_remask(cond, uncond, tokens=tokens, masked=masked, num_to_mask=num_to_mask,
                                     guidance_scale=guidance, choice_temperature=2.0, seed=0, step=0)

    def peer_step():  # the peer pipeline's CFG combine + its scheduler's step (an AmusedScheduler copy)
        return sampler.step(uncond + guidance * (cond - uncond), 0, tokens, generator=torch.Generator().manual_seed(0))

    fused_s, _ = timed(fused, args.repeats)
    peer_s, _ = timed(peer_step, args.repeats)
    logits_mb = 2 * N * K * 4 / 2**20
    return dict(shape=[2, N, K], dtype="float32", fused_seconds=fused_s, peer_step_seconds=peer_s,
                speedup=peer_s / fused_s, logits_mb=logits_mb)


def vq_stages(args) -> dict:
    from musefast import ops

    gen = torch.Generator().manual_seed(3)
    z, codebook = torch.randn(GRID * GRID, 64, generator=gen), torch.randn(8192, 64, generator=gen)
    fused_s, idx = timed(lambda: ops.vq_nearest(z, codebook), args.repeats)
    anchor_s, ref = timed(lambda: torch.cdist(z, codebook).argmin(-1), args.repeats)
    out = dict(vq_nearest=dict(shape=[GRID * GRID, 8192, 64], fused_seconds=fused_s, cdist_argmin_seconds=anchor_s,
                               speedup=anchor_s / fused_s, agreement=(idx == ref).float().mean().item()))
    if args.vq_decode:
        from musefast.models.vqgan import VQGAN
        from musefast.models.vqmodel import vqgan_config_from_diffusers

        config = vqgan_config_from_diffusers(dict(  # MeissonFlow/Meissonic's vqvae: aMUSEd's f = 16 VQ
            block_out_channels=[128, 256, 256, 512, 768], down_block_types=["DownEncoderBlock2D"] * 5,
            up_block_types=["UpDecoderBlock2D"] * 5, layers_per_block=2, latent_channels=64, num_vq_embeddings=8192,
            norm_num_groups=32, mid_block_add_attention=False, lookup_from_codebook=True, vq_embed_dim=64))
        vq = VQGAN(config).eval()
        tokens = torch.randint(0, 8192, (1, GRID, GRID), generator=gen)
        with torch.no_grad():
            seconds, pixels = timed(lambda: vq.decode(tokens), max(1, args.repeats - 1))
        out["vq_decode"] = dict(tokens=[1, GRID, GRID], pixels=list(pixels.shape), dtype="float32", seconds=seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="the JSON report (driver)")
    parser.add_argument("--peer-python", help="python of the peer's environment (diffusers 0.32.x)")
    parser.add_argument("--peer-src", help="a checkout of viiika/Meissonic (holding src/)")
    parser.add_argument("--reduced", action="store_true", help="a 2 + 2 block, 128-wide model (a quick rehearsal)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vq-decode", action="store_true", help="also time the 1024² VQ decode")
    parser.add_argument("--role", choices=["driver", "peer"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "peer":
        return peer_main(args)
    if not (args.out and args.peer_python and args.peer_src):
        parser.error("--out, --peer-python and --peer-src are required (the peer is the anchor)")
    torch.set_num_threads(args.threads)
    report = dict(architecture="reduced" if args.reduced else "MeissonFlow/Meissonic", config=REDUCED if args.reduced
                  else REAL, grid=[GRID, GRID], text_len=TEXT_LEN, batch=1, threads=args.threads,
                  torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                  note="shared 2-core machine: other jobs' load adds noise")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([args.peer_python, __file__, "--role", "peer", "--folder", tmp, "--peer-src", args.peer_src,
                        "--repeats", str(args.repeats), "--threads", str(args.threads)]
                       + (["--reduced"] if args.reduced else []), check=True)
        report["peer_forward"] = json.loads((Path(tmp) / "peer.json").read_text())
        report["musefast_forward"] = musefast_forward(args, Path(tmp))
    report["forward_speedup"] = report["peer_forward"]["seconds"] / report["musefast_forward"]["seconds"]
    report["musefast_forward"]["peak_rss_mb"] = peak_rss_mb()
    report["sampling_step"] = sampling_step(args)
    report.update(vq_stages(args))
    report["musefast_peak_rss_mb"] = peak_rss_mb()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
