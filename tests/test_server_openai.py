"""The official ``openai`` SDK against ``musefast serve`` on 127.0.0.1 (demo model): images
equal the pipeline's and ``musefast generate``'s for the same seed, edits with OpenAI's mask
convention, streaming previews, URLs, the model list and the API key."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

import musefast
from serving import LiveServer, solo_image

openai = pytest.importorskip("openai")

KEY = "test-key-123"
STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return musefast.load("demo")


@pytest.fixture(scope="module")
def server(pipe):
    with LiveServer(pipe, max_batch=4, api_key=KEY) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _pixels(b64_json: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_json))).convert("RGB"))


def test_generate_n2_equals_the_pipeline_and_the_cli_with_seeds_seed_and_seed_plus_one(client, pipe, tmp_path):
    from musefast.cli import main

    prompt, seed = "a red circle on the left", 41
    result = client.images.generate(prompt=prompt, n=2, size="64x64",
                                    extra_body={"seed": seed, "num_inference_steps": STEPS})
    assert len(result.data) == 2 and result.created > 0 and result.usage.output_tokens > 0
    served = [_pixels(d.b64_json) for d in result.data]
    assert served[0].shape == (64, 64, 3)
    for i, image in enumerate(served):
        assert np.array_equal(image, np.asarray(solo_image(pipe, prompt, seed + i, num_steps=STEPS))), i
        out = tmp_path / f"cli_{i}.png"
        assert main(["generate", prompt, "--seed", str(seed + i), "--steps", str(STEPS), "-q", "-o", str(out)]) == 0
        assert np.array_equal(image, np.asarray(Image.open(out).convert("RGB"))), i
    assert not np.array_equal(served[0], served[1])
    assert [d.model_extra["seed"] for d in result.data] == [seed, seed + 1]
    # the PNG files themselves, pixels and parameters: byte-identical to `musefast generate -n 2`
    assert main(["generate", prompt, "--seed", str(seed), "-n", "2", "--steps", str(STEPS), "-q",
                 "-o", str(tmp_path / "n2.png")]) == 0
    for i, d in enumerate(result.data):
        assert base64.b64decode(d.b64_json) == (tmp_path / f"n2_{i}.png").read_bytes(), i


def test_served_png_carries_the_parameters_that_regenerate_it(client, tmp_path):
    from musefast.cli import main

    result = client.images.generate(prompt="a blue square at the top", extra_body={"seed": 7, "num_inference_steps": 3})
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(result.data[0].b64_json))
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(served), "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(served).convert("RGB")), np.asarray(Image.open(again).convert("RGB")))


def test_edit_with_openai_mask_transparent_is_repainted(client, pipe):
    source = solo_image(pipe, "a red circle on the left", 3, num_steps=STEPS)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, 32:, 3] = 0  # right half transparent: repaint it
    image_file, mask_file = io.BytesIO(), io.BytesIO()
    source.save(image_file, format="PNG")
    Image.fromarray(rgba, "RGBA").save(mask_file, format="PNG")
    result = client.images.edit(image=("in.png", image_file.getvalue(), "image/png"),
                                mask=("mask.png", mask_file.getvalue(), "image/png"),
                                prompt="a blue square on the right", extra_body={"seed": 11, "num_inference_steps": 3})
    white = Image.fromarray(np.where(rgba[..., 3] == 0, 255, 0).astype(np.uint8), "L")
    expected = pipe.inpaint(source, white, "a blue square on the right", seed=11, num_steps=3, progress=False)[0]
    assert np.array_equal(_pixels(result.data[0].b64_json), np.asarray(expected))
    opaque = pipe.inpaint(source, Image.fromarray(255 - np.asarray(white), "L"), "a blue square on the right",
                          seed=11, num_steps=3, progress=False)[0]
    assert not np.array_equal(np.asarray(expected), np.asarray(opaque))  # the convention matters


def test_stream_gives_partial_images_then_the_final_image(client, pipe):
    events = list(client.images.generate(prompt="a green triangle on the right", stream=True, partial_images=2,
                                         extra_body={"seed": 5, "num_inference_steps": 6}))
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    final = _pixels(events[-1].b64_json)
    assert np.array_equal(final, np.asarray(solo_image(pipe, "a green triangle on the right", 5, num_steps=6)))
    previews = [_pixels(e.b64_json) for e in events[:2]]
    assert all(p.shape == final.shape for p in previews)
    assert not np.array_equal(previews[0], final)  # a preview shows the tokens of an earlier step
    assert events[-1].usage.output_tokens > 0


def test_url_response_format_is_served_by_the_server(client, server):
    import httpx

    result = client.images.generate(prompt="a yellow ring at the bottom", response_format="url",
                                    output_format="webp", extra_body={"seed": 2, "num_inference_steps": 2})
    url = result.data[0].url
    assert url.startswith(server.url + "/v1/files/") and url.endswith(".webp")
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(got.content)).size == (64, 64)
    assert httpx.get(server.url + "/v1/files/unknown.png").status_code == 404


def test_models_and_the_key(client, server):
    assert [m.id for m in client.models.list()] == ["demo"]
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="a red circle on the left")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="a red circle on the left", model="dall-e-3")
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="a red circle on the left", size="1024x1024")
