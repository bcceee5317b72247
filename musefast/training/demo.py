"""``musefast train-demo``: train the embedded demo model from scratch (Muse's recipe, small).

Stages, each with a progress bar and rows in ``train_log.jsonl``:

1. **text encoder** — a tiny T5 encoder trained on the captions, then frozen
   (:mod:`musefast.training.text` says exactly how and where its weights come from);
2. **VQGAN** — 64×64 images → 8×8 tokens (f = 8), reconstruction + codebook/commitment
   losses (:mod:`musefast.training.vqgan`);
3. **tokenize** — the transformer's training images through the frozen VQGAN, the captions
   through the frozen T5 (once each);
4. **transformer** — masked-token cross-entropy with cosine-schedule masking and 10% empty
   prompts for classifier-free guidance (:mod:`musefast.training.transformer`).

The result is a pipeline folder (``MusePipeline.save_pretrained``) plus ``train_config.json``,
``train_log.jsonl`` and ``train_summary.json`` (seconds per stage and per step, parameter
counts, weight bytes, and the checker's scores of VQGAN reconstructions of held-out images —
the ceiling of what the transformer can reach). ``musefast.load(folder)`` loads it.

Tokenizer: a VQGAN whose convolutions all run on the 8x8 token grid (``patch_size=8``: pixels
are folded into channels before the first conv and unfolded after the last; no normalisation
layers), 1024 codes, on shapes of one fixed size without jitter. Measured on the way there
(checker scores of reconstructions of held-out images): the taming-style VQGAN at these widths
mixed colours (red/yellow -> orange; colour 0.32 after 600 steps, 0.66 after 3000), because
per-image GroupNorm over a few channels erases the absolute colours of flat images; without
GroupNorm colours were right (1.0) but shapes blurred (0.40 after 1500 steps); the patch
tokenizer on jittered, variable-size shapes reached colour 1.0 / shape 0.30 in 3000 steps, and
on fixed-size shapes colour 1.0 / shape 0.87 in 2000 steps. The shipped run: see
``train_summary.json`` (``vqgan_reconstruction``) next to the weights.

Text encoder: the per-token objective of :mod:`musefast.training.text`. The first shipped
model used a mean-pooled slot probe instead; its encoder could not say which colour went with
which slot in two-shape captions, and the transformer trained on it swapped shapes and colours
between the two slots (held-out two-shape captions: colour 0.77, shape 0.77, position 0.71,
while one-shape captions were right). With per-token targets the encoder gets every held-out
binding right in 600 steps, and the same transformer recipe passes the quality gate.

Budget of the full run (:func:`full_config`): per-stage seconds are in ``train_summary.json``;
``--estimate`` re-measures on the machine at hand. Weights: about 8.4 MB of float32
safetensors (limit 25 MB).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from musefast.training.text import TextTrainConfig
from musefast.training.transformer import TransformerTrainConfig
from musefast.training.vqgan import VQGANTrainConfig

WEIGHTS_LIMIT_BYTES = 25 * 1024 * 1024


@dataclass
class DemoConfig:
    """Everything that defines a demo training run (saved as ``train_config.json``)."""

    seed: int = 0
    image_size: int = 64
    threads: int | None = None  # torch.set_num_threads (None: torch's default)
    log_every: int = 10
    # ShapesDataset settings of the training images (two_object_prob, size_range, jitter)
    dataset: dict = field(default_factory=lambda: dict(size_range=(0.375, 0.375), jitter=0.0))
    text: TextTrainConfig = field(default_factory=lambda: TextTrainConfig(steps=600))
    # VQGAN architecture (musefast.models.vqgan.VQGANConfig fields)
    vqgan: dict = field(default_factory=lambda: dict(
        patch_size=8, channels=64, channel_mult=(1,), num_res_blocks=2, num_mid_blocks=1, z_channels=32,
        embed_dim=16, codebook_size=1024, norm="none", norm_groups=4))
    vqgan_train: VQGANTrainConfig = field(default_factory=lambda: VQGANTrainConfig(
        steps=4000, batch_size=16, foreground_weight=0.0))
    num_train_images: int = 20000  # tokenized once for the transformer
    # transformer architecture (musefast.models.transformer.MuseTransformerConfig fields)
    transformer: dict = field(default_factory=lambda: dict(dim=128, depth=4, num_heads=4))
    transformer_train: TransformerTrainConfig = field(default_factory=lambda: TransformerTrainConfig(
        steps=4000, lr=1.5e-3))
    # decoding defaults stored with the pipeline (musefast.pipelines.MuseSettings fields)
    # (temperature 0.5 and a mild guidance 1.5, from a sweep on 200 held-out captions of seed 1,
    # not the gate's seed 0: shape 0.976 / 0.955 / 0.918 / 0.866 at guidance 1 / 1.5 / 2 / 3 with
    # temperature 0.5, a point or two lower at temperature 1; colour and position >= 0.976 throughout)
    settings: dict = field(default_factory=lambda: dict(
        num_steps=12, guidance_scale=1.5, temperature=0.5, edit_iterations=50, edit_fraction=0.1,
        edit_guidance_scale=1.5))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> "DemoConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DemoConfig field(s) {unknown}")
        nested = {"text": TextTrainConfig, "vqgan_train": VQGANTrainConfig, "transformer_train": TransformerTrainConfig}
        kw = {k: nested[k](**v) if k in nested else v for k, v in data.items()}
        return cls(**kw)


def full_config(seed: int = 0) -> DemoConfig:
    """The configuration of the shipped demo weights (planned for <= 60 minutes on 2 cores)."""
    return DemoConfig(seed=seed)


def quick_config(seed: int = 0) -> DemoConfig:
    """A smoke run of every stage in about one to two minutes (the model is not useful)."""
    return DemoConfig(
        seed=seed, log_every=5,
        text=TextTrainConfig(steps=80, batch_size=64),
        vqgan_train=VQGANTrainConfig(steps=300, batch_size=16, warmup=10, restart_every=25, foreground_weight=0.0),
        num_train_images=1024,
        transformer=dict(dim=64, depth=2, num_heads=2),
        transformer_train=TransformerTrainConfig(steps=300, batch_size=32, warmup=20, lr=2e-3),
        settings=dict(num_steps=8, guidance_scale=3.0),
    )


def tiny_config(seed: int = 0) -> DemoConfig:
    """Seconds-long run on tiny models, for tests: 32×32 images, 4×4 tokens."""
    return DemoConfig(
        seed=seed, image_size=32, log_every=1,
        text=TextTrainConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, steps=3, batch_size=16),
        vqgan=dict(patch_size=8, channels=8, channel_mult=(1,), num_res_blocks=1, num_mid_blocks=0, z_channels=8,
                   embed_dim=4, codebook_size=32, norm="none", norm_groups=2),
        vqgan_train=VQGANTrainConfig(steps=3, batch_size=4, warmup=1, restart_every=2),
        num_train_images=16,
        transformer=dict(dim=16, depth=1, num_heads=2),
        transformer_train=TransformerTrainConfig(steps=3, batch_size=8, warmup=1),
        settings=dict(num_steps=4, guidance_scale=2.0),
    )


PRESETS = {"full": full_config, "quick": quick_config, "tiny": tiny_config}


# -- stages ----------------------------------------------------------------------------------

def _dataset(cfg: DemoConfig, offset: int):
    from musefast.demo_data.shapes import ShapesDataset

    return ShapesDataset(cfg.seed * 1000 + offset, split="train", size=cfg.image_size, **cfg.dataset)


def _image_batches(dataset):
    from musefast.demo_data.shapes import to_tensor

    return lambda step, batch_size: to_tensor(dataset.batch(step * batch_size, batch_size)[0])


def stage_text_encoder(cfg: DemoConfig, log=None, progress: bool = True):
    from musefast.demo_data.shapes import ShapesDataset
    from musefast.training.text import build_text_encoder, train_text_encoder

    encoder = build_text_encoder(cfg.text, seed=cfg.seed)
    held_out = ShapesDataset(cfg.seed * 1000 + 4, split="held_out").captions(0, 256)
    metrics = train_text_encoder(encoder, _dataset(cfg, 0).captions, cfg.text, seed=cfg.seed, log=log,
                                 progress=progress, held_out=held_out)
    return encoder, metrics


def stage_vqgan(cfg: DemoConfig, log=None, progress: bool = True):
    import torch

    from musefast.models.vqgan import VQGAN, VQGANConfig
    from musefast.training.vqgan import train_vqgan

    torch.manual_seed(cfg.seed)
    vqgan = VQGAN(VQGANConfig(**cfg.vqgan))
    metrics = train_vqgan(vqgan, _image_batches(_dataset(cfg, 1)), cfg.vqgan_train, seed=cfg.seed, log=log,
                          progress=progress)
    return vqgan, metrics


def check_vqgan(cfg: DemoConfig, vqgan, count: int = 64) -> dict:
    """Checker scores of the VQGAN's reconstructions of ``count`` held-out images."""
    from musefast.demo_data.shapes import ShapesDataset, to_tensor
    from musefast.training.vqgan import reconstruction_scores

    data = ShapesDataset(cfg.seed * 1000 + 3, split="held_out", size=cfg.image_size, **cfg.dataset)
    images, captions, _ = data.batch(0, count)
    return reconstruction_scores(vqgan, to_tensor(images), captions)


def stage_tokenize(cfg: DemoConfig, vqgan, encoder, progress: bool = True):
    """-> (tokens (M, N), prompt row per image (M,), TextTable)."""
    import numpy as np
    import torch

    from musefast.training.text import augment_caption
    from musefast.training.transformer import TextTable
    from musefast.training.vqgan import encode_dataset

    data = _dataset(cfg, 2)
    tokens = encode_dataset(vqgan, _image_batches(data), cfg.num_train_images, progress=progress)
    rng = np.random.default_rng(cfg.seed)
    prompts = [augment_caption(c, rng) for c in data.captions(0, cfg.num_train_images)]
    table, rows = TextTable.build(encoder, prompts)
    return tokens, torch.tensor([rows[p] for p in prompts]), table


def stage_transformer(cfg: DemoConfig, tokens, prompt_ids, table, codebook_size: int, text_dim: int, log=None,
                      progress: bool = True):
    import math

    import torch

    from musefast.models.transformer import MuseTransformer, MuseTransformerConfig
    from musefast.training.transformer import train_transformer

    grid = math.isqrt(tokens.shape[1])
    torch.manual_seed(cfg.seed)
    model = MuseTransformer(MuseTransformerConfig(codebook_size=codebook_size, grid_size=grid, text_dim=text_dim,
                                                  **cfg.transformer))
    metrics = train_transformer(model, tokens, prompt_ids, table, cfg.transformer_train, seed=cfg.seed, log=log,
                                progress=progress)
    return model, metrics


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_demo(out_dir, cfg: DemoConfig | None = None, *, progress: bool = True) -> Path:
    """Run every stage and write the pipeline folder ``out_dir``; returns its path."""
    import torch

    from musefast.pipelines.muse import MusePipeline, MuseSettings
    from musefast.training.log import LossLog

    cfg = cfg or full_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    seconds, final = {}, {}
    with LossLog(out / "train_log.jsonl", every=cfg.log_every) as log:
        t = time.perf_counter()
        encoder, final["text_encoder"] = stage_text_encoder(cfg, log, progress)
        seconds["text_encoder"] = time.perf_counter() - t
        t = time.perf_counter()
        vqgan, final["vqgan"] = stage_vqgan(cfg, log, progress)
        seconds["vqgan"] = time.perf_counter() - t
        final["vqgan_reconstruction"] = check_vqgan(cfg, vqgan)
        t = time.perf_counter()
        tokens, prompt_ids, table = stage_tokenize(cfg, vqgan, encoder, progress)
        seconds["tokenize"] = time.perf_counter() - t
        t = time.perf_counter()
        transformer, final["transformer"] = stage_transformer(cfg, tokens, prompt_ids, table,
                                                              vqgan.config.codebook_size, encoder.hidden_size,
                                                              log, progress)
        seconds["transformer"] = time.perf_counter() - t
    pipe = MusePipeline(vqgan, transformer, encoder, settings=MuseSettings(**cfg.settings))
    pipe.save_pretrained(out)
    weights = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    steps = {"text_encoder": cfg.text.steps, "vqgan": cfg.vqgan_train.steps,
             "transformer": cfg.transformer_train.steps}
    summary = {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 2),
        "seconds_per_step": {k: round(seconds[k] / max(1, n), 4) for k, n in steps.items()},
        "parameters": {"text_encoder": _params(encoder.model), "vqgan": _params(vqgan),
                       "transformer": _params(transformer)},
        "weights_bytes": weights,
        "weights_within_limit": weights <= WEIGHTS_LIMIT_BYTES,
        "distinct_prompts": int(table.hidden.shape[0]),
        "final_metrics": final,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def estimate(cfg: DemoConfig, *, probe_steps: int = 6, probe_images: int = 256, progress: bool = False) -> dict:
    """Time a few steps of every stage with ``cfg``'s models and batch sizes and project the
    full run: ``{stage: {"seconds_per_step", "steps", "projected_s"}, "total_projected_s"}``.

    Per-step time is the median interval between logged steps after the first (warm-up)."""
    import statistics

    import torch

    from musefast.training.log import LossLog

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    probe = DemoConfig.from_dict(cfg.to_dict())
    n = max(3, probe_steps)
    probe.text.steps = probe.vqgan_train.steps = probe.transformer_train.steps = n
    probe.num_train_images = probe_images
    log = LossLog(None, every=1)

    def per_step(stage: str) -> float:
        times = [r["elapsed_s"] for r in log.rows if r["stage"] == stage]
        return statistics.median(b - a for a, b in zip(times[1:], times[2:]))

    encoder, _ = stage_text_encoder(probe, log, progress)
    vqgan, _ = stage_vqgan(probe, log, progress)
    t = time.perf_counter()
    tokens, prompt_ids, table = stage_tokenize(probe, vqgan, encoder, progress)
    tokenize_per_image = (time.perf_counter() - t) / probe_images
    stage_transformer(probe, tokens, prompt_ids, table, vqgan.config.codebook_size, encoder.hidden_size, log,
                      progress)
    result, total = {}, 0.0
    for stage, steps in (("text_encoder", cfg.text.steps), ("vqgan", cfg.vqgan_train.steps),
                         ("transformer", cfg.transformer_train.steps)):
        s = per_step(stage)
        total += s * steps
        result[stage] = {"seconds_per_step": round(s, 4), "steps": steps, "projected_s": round(s * steps, 1)}
    total += tokenize_per_image * cfg.num_train_images
    result["tokenize"] = {"seconds_per_image": round(tokenize_per_image, 5), "images": cfg.num_train_images,
                          "projected_s": round(tokenize_per_image * cfg.num_train_images, 1)}
    # summed before rounding: a tiny config's stages each round to 0.0 s but the whole is not free
    result["total_projected_s"] = round(total, 3)
    result["torch_threads"] = torch.get_num_threads()
    return result


# -- command line ----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="demo-model", help="pipeline folder to write")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="full: the shipped model (<= 60 min on 2 cores); quick: 1-2 minute smoke run; tiny: tests")
    p.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    p.add_argument("--config", default=None, help="a train_config.json to use instead of a preset")
    p.add_argument("--seed", type=int, default=None, help="override the configuration's seed")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--estimate", action="store_true",
                   help="time a few steps of each stage and print the projected full-run time instead of training")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    if args.config:
        cfg = DemoConfig.from_dict(json.loads(Path(args.config).read_text()))
    else:
        cfg = PRESETS[args.preset]()
    if args.seed is not None:
        cfg.seed = args.seed
    if args.threads is not None:
        cfg.threads = args.threads
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.estimate:
        print(json.dumps(estimate(cfg, progress=not args.quiet), indent=2))
        return 0
    out = train_demo(args.output, cfg, progress=not args.quiet)
    summary = json.loads((out / "train_summary.json").read_text())
    print(f"wrote {out} in {summary['total_seconds'] / 60:.1f} min; weights {summary['weights_bytes'] / 2**20:.2f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_demo", description="Train the musefast demo model from scratch.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
