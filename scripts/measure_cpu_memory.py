"""Peak resident memory of a CPU generation against the weights' size (the target: ≤ 1.3×).

Builds (once) a diffusers aMUSEd folder with random weights of the real aMUSEd-256 architecture
(UVit2D 22 × 1024, CLIP-L/14-sized text encoder, the 8192 × 64 VQ; diffusers + transformers
needed, offline), then, for fp32 and dtype="auto" (bf16 on an AVX512-BF16/AMX CPU), with the CPU
engine keeping its plain weights (MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS=1, before) and releasing them
(the default, after), runs in a fresh process: ``import torch, musefast`` (the baseline),
``musefast.load(folder)``, one 12-step text-to-image generation at batch 1. It records VmHWM (the
peak RSS, /proc/self/status) after each stage, and the growth over the baseline divided by the
weights' size (every parameter of the pipeline, in the dtype it runs in).

    python scripts/measure_cpu_memory.py [--size amused-256|reduced] [--folder DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_UVIT = {"amused-256": {}, "reduced": dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=4, in_channels=128,
                                           block_out_channels=128, block_num_heads=4, num_res_blocks=1,
                                           intermediate_size=704, cond_embed_dim=256, encoder_hidden_size=256)}


def _vm(field: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def build(folder: Path, size: str) -> None:
    """A diffusers aMUSEd pipeline folder with random weights (fp32 files)."""
    import torch
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_text import clip_vocab_and_merges  # an offline CLIP BPE vocabulary

    full = size == "amused-256"
    torch.manual_seed(0)
    uvit = UVit2DModel(sample_size=16, **_UVIT[size]).eval()
    with torch.no_grad():  # GRN and norm parameters start at 0 / 1: give them values
        for name, p in uvit.named_parameters():
            if "gamma" in name or "beta" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    widths = (128, 256, 256, 512, 768) if full else (32, 32, 64, 64, 64)
    vq = VQModel(down_block_types=("DownEncoderBlock2D",) * 5, up_block_types=("UpDecoderBlock2D",) * 5,
                 block_out_channels=widths, layers_per_block=2 if full else 1, latent_channels=64,
                 num_vq_embeddings=8192, norm_num_groups=32, mid_block_add_attention=False, lookup_from_codebook=True,
                 force_upcast=True).eval()
    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    hidden = 768 if full else 256
    text = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408 if full else len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=12 if full else 2, num_attention_heads=12 if full else 4,
        projection_dim=uvit.config.cond_embed_dim, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    AmusedPipeline(vqvae=vq, tokenizer=tokenizer, text_encoder=text, transformer=uvit,
                   scheduler=AmusedScheduler(mask_token_id=8255)).save_pretrained(folder)


def child(folder: str, dtype: str) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    import musefast
    from musefast.cpu import linear as cpu

    base = _vm("VmHWM")
    pipe = musefast.load(folder, dtype=None if dtype == "float32" else dtype)
    loaded = _vm("VmHWM")
    modules = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder.model, "vqvae": pipe.vqvae}
    weights = {k: sum(p.numel() * p.element_size() for p in m.parameters()) for k, m in modules.items()}
    pipe("a photo of a red cat on the house", num_inference_steps=12, seed=0, output_type="pt", progress=False)
    peak = _vm("VmHWM")
    total = sum(weights.values())
    return {"dtype": dtype, "run_dtype": str(pipe.dtype).removeprefix("torch."),
            "musefast": str(Path(musefast.__file__).parent.parent),
            # an older musefast (--musefast-path) has no release: it keeps the plain weights
            "keep_weights": not getattr(cpu, "release_by_default", lambda: False)(), "threads": torch.get_num_threads(),
            "baseline_hwm_mib": base / 2**20, "after_load_hwm_mib": loaded / 2**20, "after_generation_hwm_mib": peak / 2**20,
            "weights_mib": {k: v / 2**20 for k, v in weights.items()}, "weights_total_mib": total / 2**20,
            "load_growth_over_weights": (loaded - base) / total, "peak_growth_over_weights": (peak - base) / total,
            "released_mib": sum(getattr(r, "released_bytes", 0) for r in [m.__dict__.get(cpu.REPORT_ATTR) for m in modules.values()]
                                if r is not None) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(_UVIT), default="amused-256")
    parser.add_argument("--folder", type=Path, default=None, help="the aMUSEd folder (built there if absent)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results"
                        / f"cpu-memory-{datetime.date.today().isoformat()}.json")
    parser.add_argument("--dtypes", default="float32,auto")
    parser.add_argument("--musefast-path", type=Path, default=None,
                        help="also measure the musefast checkout there (e.g. the main branch, before this change)")
    parser.add_argument("--variants", default="other,keep,release",
                        help="which of: other (--musefast-path), keep (KEEP_WEIGHTS=1), release (the default)")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    folder = args.folder or Path(f"/tmp/musefast-{args.size}-random")
    if not (folder / "model_index.json").is_file():
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
                        f"from measure_cpu_memory import build; from pathlib import Path; build(Path({str(folder)!r}), {args.size!r})"],
                       check=True)
    runs = []
    variants = {"keep": ("1", None), "release": ("0", None)}  # plain weights kept beside the packed ones; released
    if args.musefast_path:
        variants = {"other": ("1", str(args.musefast_path.resolve())), **variants}
    variants = [variants[v] for v in args.variants.split(",") if v in variants]
    for dtype in args.dtypes.split(","):
        for keep, path in variants:
            env = {**os.environ, "MUSEFAST_CPU_ENGINE_KEEP_WEIGHTS": keep}
            if path:
                env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), dtype], env=env, check=True,
                                 capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    import torch

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    args.out.write_text(json.dumps({"size": args.size, "date": datetime.date.today().isoformat(), "commit": commit,
                                    "torch": torch.__version__, "cpus": os.cpu_count(), "runs": runs,
                                    "note": "peak RSS (VmHWM) growth over the `import torch, musefast` baseline, "
                                            "divided by the pipeline's parameter bytes in the dtype it runs in; "
                                            "shared machine"}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
