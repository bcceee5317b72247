"""`musefast batch` on the engine for aMUSEd and Meissonic folders: 40 prompts -> 40 images and
a manifest, each image the pipeline's single call for its prompt and seed; rows with different
settings share forwards; resume skips them; `-o FILE` is one error line."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import musefast
from musefast.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from amused_tiny import make_tiny_amused  # noqa: E402

MEISSONIC = Path(__file__).parent / "fixtures" / "meissonic" / "meissonic"
WORDS = ["red", "blue", "green", "cat", "dog", "house", "tree", "on", "a", "big"]


def _prompts(n):
    return [" ".join(WORDS[(i * k) % len(WORDS)] for k in (1, 3, 7)) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def amused_folder(tmp_path_factory):
    pytest.importorskip("diffusers")  # the tiny aMUSEd folder is written by diffusers (the peers extra)
    folder = tmp_path_factory.mktemp("amused") / "pipe"
    make_tiny_amused(folder, "256")
    shutil.rmtree(folder / "_clip", ignore_errors=True)
    return folder


@pytest.mark.parametrize("family", ["amused", "meissonic"])
def test_forty_prompts_give_the_pipelines_images(family, request, tmp_path):
    folder, size = (request.getfixturevalue("amused_folder"), None) if family == "amused" else (MEISSONIC, 128)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(_prompts(40)) + "\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "-o", str(out), "--model", str(folder), "--steps", "3", "--batch-size", "6", "-q"]
    assert main(args + ([] if size is None else ["--size", str(size)])) == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and len(list((out / "images").glob("*.png"))) == 40
    pipe = musefast.load(folder)
    kw = {} if size is None else dict(height=size, width=size)
    for record in lines:
        assert record["family"] == family and record["num_steps"] == 3
        image = Image.open(out / record["file"])
        assert image.text["family"] == family and image.text["seed"] == str(record["seed"])
        single = pipe(record["prompt"], seed=record["seed"], num_inference_steps=3, output_type="pil",
                      progress=False, **kw)[0]
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(single)), record["id"]
    assert main(args + ([] if size is None else ["--size", str(size)])) == 0  # resume: all skipped
    assert (out / "manifest.jsonl").read_text().count("\n") == 40


def test_rows_with_different_settings_share_forwards(amused_folder, tmp_path):
    from musefast.batch.job import make_job
    from musefast.batch.rows import read_rows
    from musefast.batch.worker import Done, Worker

    pipe = musefast.load(amused_folder)
    rows = read_rows([{"prompt": p, "num_steps": 2 + i % 3, "guidance_scale": [1.0, 4.0, 10.0][i % 3],
                       "negative_prompt": "blue" if i % 2 else None} for i, p in enumerate(_prompts(9))])
    shared = Worker(pipe, make_job(pipe, "tiny"), max_batch=9)
    alone = Worker(pipe, make_job(pipe, "tiny"), deterministic=True)
    got = {d.record["id"]: d.record["tokens_sha256"] for d in shared.generate(rows) if isinstance(d, Done)}
    assert got == {d.record["id"]: d.record["tokens_sha256"] for d in alone.generate(rows)}
    assert len(got) == 9


def test_output_naming_a_file_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        main(["batch", str(prompts), "-o", str(existing), "-q"])
    message = str(info.value.code)
    assert message.startswith("musefast batch: output") and "is a file" in message and "\n" not in message


def test_a_size_the_model_cannot_make_fails_the_job(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    with pytest.raises(SystemExit, match="musefast batch: size .* this model works at"):
        main(["batch", str(prompts), "-o", str(tmp_path / "out"), "--size", "32", "-q"])


def test_amused_edits_on_the_engine_equal_the_pipeline(amused_folder):
    import torch

    from musefast.generation import Engine, Request

    pipe = musefast.load(amused_folder)
    image = pipe("a red cat", seed=1, num_inference_steps=2, output_type="pt", progress=False)[0]
    mask = torch.zeros(image.shape[-2:], dtype=torch.bool)
    mask[:, : image.shape[-1] // 2] = True
    img2img = Request(prompt="a blue dog", seed=2, num_steps=4, init_image=image, strength=0.5)
    inpaint = Request(prompt="a green tree", seed=3, num_steps=4, init_image=image, mask=mask)
    got = [h.result() for h in Engine(pipe, max_batch=2).run([img2img, inpaint])]
    assert torch.equal(got[0], pipe("a blue dog", image=image, strength=0.5, seed=2, num_inference_steps=4,
                                    output_type="tokens", progress=False)[0])
    assert torch.equal(got[1], pipe.inpaint(image, mask, "a green tree", seed=3, num_inference_steps=4,
                                            output_type="tokens", progress=False)[0])


def test_meissonic_rows_at_different_timesteps_share_a_forward():
    import torch

    from musefast.generation import Engine, Request

    pipe = musefast.load(MEISSONIC)
    requests = [Request(prompt=p, seed=20 + i, num_steps=[4, 3, 5][i % 3], guidance_scale=[9.0, 1.0, 3.0][i % 3],
                        size=(128, 128)) for i, p in enumerate(_prompts(6))]
    engine = Engine(pipe, max_batch=4)
    got = [h.result() for h in engine.run(requests)]
    assert engine.forwards < sum(r.num_steps for r in requests)
    for r, tokens in zip(requests, got):
        single = pipe(r.prompt, height=128, width=128, seed=r.seed, num_inference_steps=r.num_steps,
                      guidance_scale=r.guidance_scale, output_type="tokens", progress=False)[0]
        assert torch.equal(tokens, single)
