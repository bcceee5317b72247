"""The demo training path on tiny models: objectives, loss going down, the train-demo run and
the evaluation script."""
import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from musefast.demo_data.shapes import COLOURS, SHAPES, SLOTS, ShapesDataset, to_tensor, vocabulary
from musefast.models.transformer import MuseTransformer, MuseTransformerConfig
from musefast.models.vqgan import VQGAN, VQGANConfig
from musefast.training import demo
from musefast.training.text import (IGNORE, TextTrainConfig, build_text_encoder, build_tokenizer, token_targets,
                                    train_text_encoder)
from musefast.training.transformer import (TextTable, TransformerTrainConfig, attention_backend, cosine_mask,
                                           masked_token_loss, train_transformer)
from musefast.training.vqgan import VQGANTrainConfig, foreground_mask, train_vqgan, vqgan_step

REPO = Path(__file__).resolve().parent.parent
TINY_TEXT = TextTrainConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, batch_size=32, lr=5e-3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models train faster on one thread (no OpenMP hand-offs), most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text_encoder():
    return build_text_encoder(TINY_TEXT, seed=0)


def test_cosine_mask_counts_and_rate():
    gen = torch.Generator().manual_seed(0)
    masked = cosine_mask(4000, 16, generator=gen)
    counts = masked.sum(1)
    assert counts.min() >= 1 and counts.max() <= 16
    # E[ceil(16 cos(pi r / 2))] / 16 with r ~ U[0, 1): 2/pi plus the ceiling's ~1/32
    rate = counts.float().mean().item() / 16
    assert abs(rate - (2 / math.pi + 1 / 32)) < 0.01, rate
    # the masked positions are spread over the whole sequence
    assert masked.float().mean(0).min() > 0.55


def test_tokenizer_has_every_caption_word():
    tok = build_tokenizer()
    for word in vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    assert tok("").input_ids == [tok.eos_token_id]
    ids = tok("a red circle on the right of an orange square").input_ids
    assert len(ids) <= 16 and tok.unk_token_id not in ids


def test_text_encoder_training_reduces_loss_and_freezes(text_encoder):
    ds = ShapesDataset(0)
    first = train_text_encoder(text_encoder, ds.captions, TextTrainConfig(**{**vars(TINY_TEXT), "steps": 1}),
                               progress=False)
    last = train_text_encoder(text_encoder, ds.captions, TextTrainConfig(**{**vars(TINY_TEXT), "steps": 30}),
                              progress=False)
    assert last["loss"] < 0.8 * first["loss"], (first, last)
    assert 0 <= last["token_accuracy"] <= 1 and 0 <= last["caption_accuracy"] <= 1
    assert not any(p.requires_grad for p in text_encoder.model.parameters())
    assert not text_encoder.model.training


def test_token_targets_follow_the_words(text_encoder):
    colours, shapes, slots = list(COLOURS), list(SHAPES), list(SLOTS)
    ids, mask, targets = token_targets(text_encoder, ["A red circle on the left of a blue square.", ""])
    tokens = text_encoder.tokenizer.convert_ids_to_tokens(ids[0][mask[0]])
    assert tokens == ["\u2581A", "\u2581red", "\u2581circle", "\u2581on", "\u2581the", "\u2581left", "\u2581of",
                      "\u2581a", "\u2581blue", "\u2581square", ".", "</s>"]
    red = [colours.index("red"), shapes.index("circle"), slots.index("left")]
    blue = [colours.index("blue"), shapes.index("square"), slots.index("right")]
    ignore = [IGNORE] * 3
    expected = [red] * 3 + [ignore] * 4 + [blue] * 4 + [ignore]  # the full stop belongs to "square."
    assert targets[0, :12].tolist() == expected
    assert (targets[0, 12:] == IGNORE).all() and (targets[1] == IGNORE).all()  # padding, empty prompt
    assert mask[1].sum() == 1  # "" is just </s>


def test_text_encoder_learns_held_out_bindings():
    """The per-token objective generalises to unseen combinations (the pooled one did not)."""
    cfg = TextTrainConfig(d_model=32, num_layers=2, num_heads=4, d_ff=64, steps=300, batch_size=64, lr=1e-2)
    encoder = build_text_encoder(cfg, seed=0)
    held_out = ShapesDataset(1, split="held_out").captions(0, 64)
    metrics = train_text_encoder(encoder, ShapesDataset(0).captions, cfg, progress=False, held_out=held_out)
    assert metrics["held_out_token_accuracy"] > 0.9, metrics


def test_vqgan_training_reduces_loss():
    cfg = VQGANConfig(channels=4, channel_mult=(1, 2, 2, 2), num_res_blocks=1, num_mid_blocks=0, z_channels=8,
                      embed_dim=4, codebook_size=32, norm_groups=2)
    torch.manual_seed(0)
    vqgan = VQGAN(cfg)
    ds = ShapesDataset(0, size=32)
    fixed = to_tensor(ds.batch(0, 8)[0])
    with torch.no_grad():
        before = vqgan_step(vqgan, fixed)[0].item()
    metrics = train_vqgan(vqgan, lambda step, b: fixed[:b], VQGANTrainConfig(steps=40, batch_size=8, lr=3e-3, warmup=2,
                                                                             restart_every=10), progress=False)
    with torch.no_grad():
        after = vqgan_step(vqgan, fixed)[0].item()
    assert after < 0.7 * before, (before, after)
    assert metrics["codes_used"] > 1
    assert not vqgan.training
    assert vqgan.encoder.conv_in.weight.is_contiguous()  # back in the standard layout for saving


def test_foreground_mask_marks_exactly_the_shapes():
    import numpy as np

    from musefast.demo_data.shapes import BACKGROUNDS

    images, _, scenes = ShapesDataset(2).batch(0, 6)
    mask = foreground_mask(to_tensor(images))[:, 0].bool().numpy()
    for image, scene, m in zip(images, scenes, mask):
        assert np.array_equal(m, (image != np.array(BACKGROUNDS[scene.background], dtype=np.uint8)).any(-1))


def test_transformer_training_reduces_masked_token_loss(text_encoder):
    cfg = MuseTransformerConfig(codebook_size=32, grid_size=4, dim=32, depth=1, num_heads=2,
                                text_dim=text_encoder.hidden_size)
    torch.manual_seed(0)
    model = MuseTransformer(cfg)
    tokens = torch.randint(0, 32, (8, 16), generator=torch.Generator().manual_seed(1))
    prompts = ShapesDataset(0).captions(0, 8)
    table, rows = TextTable.build(text_encoder, prompts)
    assert table.hidden.shape[0] == len(set(prompts)) + 1 and rows[""] == table.empty_id
    prompt_ids = torch.tensor([rows[p] for p in prompts])
    masked = torch.ones(8, 16, dtype=torch.bool)

    def eval_loss():
        with torch.no_grad():
            return masked_token_loss(model, tokens, masked, table.hidden[prompt_ids], table.mask[prompt_ids])[0].item()

    before = eval_loss()
    train_transformer(model, tokens, prompt_ids, table,
                      TransformerTrainConfig(steps=60, batch_size=16, lr=3e-3, warmup=5, cond_dropout=0.0),
                      progress=False)
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
    assert not model.training


def test_attention_backend_is_restored_and_loss_only_on_masked_positions(text_encoder):
    cfg = MuseTransformerConfig(codebook_size=16, grid_size=2, dim=16, depth=1, num_heads=2,
                                text_dim=text_encoder.hidden_size, backend="reference")
    model = MuseTransformer(cfg)
    with attention_backend(model, "sdpa"):
        assert model.blocks[0].attn.backend == "sdpa" and model.blocks[0].cross_attn.backend == "sdpa"
    assert model.blocks[0].attn.backend == "reference"
    emb = text_encoder.encode(["a red circle on the left"])
    tokens = torch.tensor([[1, 2, 3, 4]])
    masked = torch.tensor([[True, False, False, False]])
    loss, _ = masked_token_loss(model, tokens, masked, emb.hidden, emb.mask)
    logits = model(tokens.masked_fill(masked, model.mask_token_id), emb.hidden, emb.mask)
    expected = torch.nn.functional.cross_entropy(logits[0, :1], tokens[0, :1])
    torch.testing.assert_close(loss, expected)


def test_train_demo_tiny_writes_a_loadable_pipeline(tmp_path):
    import musefast
    from musefast.cli import main

    out = tmp_path / "demo"
    assert main(["train-demo", "--preset", "tiny", "-o", str(out), "-q", "--seed", "1"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert set(summary["seconds"]) == {"text_encoder", "vqgan", "tokenize", "transformer"}
    assert summary["weights_within_limit"] and summary["weights_bytes"] > 0
    recon = summary["final_metrics"]["vqgan_reconstruction"]
    assert recon["n_images"] == 64 and 0.0 <= recon["colour"] <= 1.0 and recon["l1"] >= 0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"text_encoder", "vqgan", "transformer"}
    assert all(math.isfinite(r["loss"]) for r in rows)
    config = json.loads((out / "train_config.json").read_text())
    assert config["seed"] == 1 and demo.DemoConfig.from_dict(config).transformer_train.steps == 3
    pipe = musefast.load(out)
    assert pipe.settings.num_steps == 4
    images = pipe("a red circle on the left", seed=0, output_type="pt", progress=False)
    assert images.shape == (1, 3, 32, 32)


def test_train_demo_is_reproducible(tmp_path):
    """Same config and seed -> the same weights, bit for bit (how the shipped demo weights can be
    reproduced with `musefast train-demo`)."""
    from safetensors.torch import load_file

    for name in ("a", "b"):
        demo.train_demo(tmp_path / name, demo.tiny_config(seed=2), progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 3
    for f in files:
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_estimate_projects_every_stage():
    result = demo.estimate(demo.tiny_config(), probe_steps=3, probe_images=8)
    for stage in ("text_encoder", "vqgan", "transformer", "tokenize"):
        assert result[stage]["projected_s"] >= 0
    assert result["total_projected_s"] > 0


def test_full_config_fits_the_weights_budget():
    cfg = demo.full_config()
    vqgan = VQGAN(VQGANConfig(**cfg.vqgan))
    model = MuseTransformer(MuseTransformerConfig(codebook_size=cfg.vqgan["codebook_size"], grid_size=8,
                                                  text_dim=cfg.text.d_model, **cfg.transformer))
    params = sum(p.numel() for m in (vqgan, model) for p in m.parameters())
    assert params * 4 < demo.WEIGHTS_LIMIT_BYTES * 0.9
    assert cfg.image_size // vqgan.downsampling_factor == 8


def test_eval_script_runs_on_a_tiny_random_pipeline(tmp_path, text_encoder):
    from musefast.pipelines.random_init import random_pipeline

    folder = tmp_path / "pipe"
    random_pipeline("tiny", text_encoder=text_encoder).save_pretrained(folder)
    script = runpy.run_path(str(REPO / "scripts" / "eval_demo.py"))
    out = tmp_path / "eval.json"
    grid = tmp_path / "grid.png"
    assert script["main"](["--model", str(folder), "--count", "6", "--batch-size", "4", "--steps", "2",
                           "--edit-count", "2", "-o", str(out), "--grid", str(grid),
                           "--edit-grid", str(tmp_path / "edits.png")]) == 0
    assert (tmp_path / "edits.png").is_file() and (tmp_path / "edits.txt").read_text().count("\n") == 12
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"cfg", "no_cfg", "reference", "inpaint", "outpaint", "edit"}
    for name, run in report["runs"].items():
        assert run["n_images"] == (2 if name in ("inpaint", "outpaint", "edit") else 6)
        assert 0.0 <= run["colour"] <= 1.0
    assert report["runs"]["no_cfg"]["guidance_scale"] == 1.0
    assert 0.0 <= report["fast_reference_token_agreement"] <= 1.0
    assert isinstance(report["gate"]["passed"], bool)
    assert grid.is_file() and grid.with_suffix(".txt").read_text().count("\n") == 6
