"""The server's checks that need no running server: ServerConfig, the request fields, the
mask convention, where previews fall, the ``serve`` command's own refusals."""
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from musefast.serve.config import Limits, ServerConfig  # noqa: E402
from musefast.serve.errors import APIError  # noqa: E402
from musefast.serve.params import parse  # noqa: E402
from musefast.serve.uploads import openai_mask  # noqa: E402
from musefast.serve.worker import preview_steps  # noqa: E402


@pytest.mark.parametrize("kw, words", [
    (dict(port=70000), "port"), (dict(max_batch=0), "max_batch"), (dict(max_queue=True), "max_queue"),
    (dict(grace=-1), "grace"), (dict(request_timeout=0), "request_timeout"), (dict(cors=["example.com"]), "cors"),
    (dict(api_key="two words"), "api_key"), (dict(model=""), "model"), (dict(limits={"max_n": 3}), "limits"),
])
def test_config_refuses_bad_values_in_one_line(kw, words):
    with pytest.raises((ValueError, TypeError), match=words) as info:
        ServerConfig(**kw)
    assert "\n" not in str(info.value)


def test_config_defaults_key_from_environment_and_model_id(monkeypatch, tmp_path):
    monkeypatch.setenv("MUSEFAST_API_KEY", "from-env")
    config = ServerConfig()
    assert (config.host, config.port, config.api_key, config.cors, config.loopback) == \
        ("127.0.0.1", 8000, "from-env", (), True)
    assert ServerConfig(api_key="given").api_key == "given"
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert ServerConfig(model=str(folder) + "/").model_id == "my-model"  # a name, never the server's path
    assert ServerConfig(model="amused/amused-256").model_id == "amused/amused-256"
    with pytest.raises(ValueError, match="max_n"):
        Limits(max_n=11)


def test_n_images_take_seeds_seed_plus_index():
    requests, output = parse({"prompt": "a red circle on the left", "n": 3, "seed": 9, "size": "64x48",
                              "num_inference_steps": 4, "guidance_scale": 2, "negative_prompt": "blue"},
                             model_id="demo", limits=Limits())
    assert [r.seed for r in requests] == [9, 10, 11]
    settings = {(r.size, r.num_steps, r.guidance_scale, r.negative_prompt) for r in requests}
    assert settings == {((48, 64), 4, 2.0, "blue")}
    assert (output.response_format, output.output_format, output.stream) == ("b64_json", "png", False)
    drawn, _ = parse({"prompt": "a red circle on the left", "n": 2}, model_id="demo", limits=Limits())
    assert drawn[1].seed == drawn[0].seed + 1


def test_multipart_text_values_are_read_as_numbers():
    requests, output = parse({"prompt": "p", "n": "2", "seed": "5", "stream": "true", "partial_images": "1",
                              "strength": "0.5"}, model_id="demo", limits=Limits(), edit=True,
                             init_image=Image.new("RGB", (8, 8)))
    assert [r.seed for r in requests] == [5, 6] and requests[0].strength == 0.5
    assert output.stream and output.partial_images == 1


@pytest.mark.parametrize("body, param", [
    ({"prompt": "p", "seed": 2**63 - 1, "n": 2}, "seed"),
    ({"prompt": "p", "stream": "yes"}, "stream"),
    ({"prompt": "p", "stream": True, "response_format": "url"}, "response_format"),
    ({"prompt": "p", "user": 3}, "user"),
    ({"prompt": "p", "quality": "ultra"}, "quality"),
    ({"prompt": "p", "mask": "/tmp/mask.png"}, "mask"),
])
def test_bad_fields_name_themselves(body, param):
    with pytest.raises(APIError) as info:
        parse(body, model_id="demo", limits=Limits())
    assert info.value.status == 400 and info.value.param == param and info.value.message


def test_openai_mask_transparent_becomes_white():
    rgba = np.full((4, 4, 4), 255, np.uint8)
    rgba[:2, :, 3] = 0
    rgba[2, 0, 3] = 128  # half transparent: kept, as OpenAI repaints only fully transparent pixels
    mask = np.asarray(openai_mask(Image.fromarray(rgba, "RGBA")))
    assert (mask[:2] == 255).all() and (mask[2:] == 0).all()
    with pytest.raises(APIError, match="alpha channel"):
        openai_mask(Image.new("L", (4, 4), 255))


def test_previews_spread_over_the_steps():
    assert preview_steps(12, 3) == [3, 6, 9]
    assert preview_steps(12, 1) == [6]
    assert preview_steps(2, 3) == [1]  # too few steps: fewer previews, never the final step
    assert preview_steps(1, 2) == [] and preview_steps(10, 0) == []


def test_serve_without_ray_serve_module_is_one_line(monkeypatch, capsys):
    import sys

    from musefast.cli import main

    monkeypatch.setitem(sys.modules, "musefast.serve.ray_serve", None)  # as if it were not installed
    assert main(["serve", "--ray", "--replicas", "2"]) == 1
    err = capsys.readouterr().err
    assert "Ray Serve support is not available" in err and len(err.strip().splitlines()) == 1
