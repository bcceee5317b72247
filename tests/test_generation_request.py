"""Request: one-line errors for bad values, the metadata round trip, and adapter defaults."""
import json

import pytest
import torch

import musefast
from musefast.generation import Engine, Request
from musefast.sampling.cache import StepCache


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt=""), ValueError, "prompt must be a non-empty string"),
    (dict(prompt="   "), ValueError, "prompt must be a non-empty string"),
    (dict(prompt=None), ValueError, "prompt must be a non-empty string"),
    (dict(prompt="a", prompt_embeds=torch.zeros(1, 2, 3)), ValueError, "prompt or prompt_embeds"),
    (dict(prompt="a", negative_prompt=3), TypeError, "negative_prompt must be a string"),
    (dict(prompt="a", seed=-1), ValueError, "seed must be an int in"),
    (dict(prompt="a", seed=2**63), ValueError, "seed must be an int in"),
    (dict(prompt="a", seed=True), TypeError, "seed must be an int"),
    (dict(prompt="a", seed=1.5), TypeError, "seed must be an int"),
    (dict(prompt="a", num_steps=0), ValueError, "num_steps must be an int in"),
    (dict(prompt="a", guidance_scale=-1.0), ValueError, "guidance_scale must be a finite number >= 0"),
    (dict(prompt="a", guidance_scale="high"), TypeError, "guidance_scale must be a number"),
    (dict(prompt="a", guidance_schedule="ramp"), ValueError, "guidance_schedule must be one of"),
    (dict(prompt="a", guidance_interval=(0.6, 0.2)), ValueError, "guidance_interval must satisfy"),
    (dict(prompt="a", temperature=-0.1), ValueError, "temperature must be a finite number >= 0"),
    (dict(prompt="a", choice_temperature=(1, 2, 3)), ValueError, "choice_temperature must be a number or a"),
    (dict(prompt="a", size=(0, 64)), ValueError, "size must be an int in"),
    (dict(prompt="a", size="big"), ValueError, "size must be"),
    (dict(prompt="a", cache="fastest"), ValueError, "cache must be None"),
    (dict(prompt="a", mask=torch.ones(8, 8)), ValueError, "mask needs init_image"),
    (dict(prompt="a", strength=0.5), ValueError, "strength applies to image-to-image"),
    (dict(prompt="a", init_image=torch.rand(3, 8, 8), strength=0.0), ValueError, r"strength must lie in \(0, 1\]"),
    (dict(prompt="a", init_image=torch.rand(3, 8, 8), size=(8, 8)), ValueError, "size comes from the image"),
])
def test_bad_values_are_one_line_errors(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        Request(**kwargs)
    assert "\n" not in str(info.value)


def test_metadata_round_trip_keeps_every_setting():
    custom = StepCache(refresh=2, recompute="lowest_confidence", fraction=0.5, guidance_interval=(0.0, 0.75))
    for cache in (None, "fast", custom):
        request = Request(prompt="a red circle", negative_prompt="blue", seed=2**62 + 5, num_steps=7,
                          guidance_scale=3.5, guidance_schedule="linear", guidance_interval=(0.1, 0.9),
                          temperature=0.7, choice_temperature=(2, 0), size=(64, 64), cache=cache,
                          family="muse", model="demo")
        meta = json.loads(json.dumps(request.to_metadata()))  # what a PNG chunk or a manifest line holds
        assert meta["cache"] == (custom.__dict__ | {"guidance_interval": [0.0, 0.75]} if cache is custom else cache)
        assert Request.from_metadata(meta) == request
        assert Request.from_metadata({**meta, "file": "images/1.png", "musefast": "0.1"}) == request


def test_metadata_of_edits_and_embeddings():
    image = torch.rand(3, 64, 64)
    meta = Request(prompt="a", init_image=image, strength=0.5).to_metadata()
    assert meta["edit"] == "img2img" and meta["strength"] == 0.5
    with pytest.raises(ValueError, match="pass its init_image"):
        Request.from_metadata(meta)
    assert Request.from_metadata(meta, init_image=image).strength == 0.5
    with pytest.raises(ValueError, match="no prompt to write"):
        Request(prompt_embeds=torch.zeros(1, 4, 8)).to_metadata()
    with pytest.raises(ValueError, match="engine runs 'fused'"):
        Request.from_metadata({"prompt": "a", "sampler": "compat"})


def test_the_demo_adapter_fills_its_defaults_and_refuses_what_it_cannot_run():
    pipe = musefast.load("demo")
    engine = Engine(pipe, model_name="demo")
    resolved = engine.resolve(Request(prompt="a red circle", seed=3))
    s = pipe.settings
    assert (resolved.family, resolved.model, resolved.num_steps, resolved.guidance_scale, resolved.temperature) == (
        "muse", "demo", s.num_steps, s.guidance_scale, s.temperature)
    assert resolved.size == (pipe.output_size,) * 2
    assert engine.resolve(Request(prompt="a", num_steps=3)).num_steps == 3  # given values stay
    with pytest.raises(ValueError, match="works at"):
        engine.resolve(Request(prompt="a", size=(32, 48)))
    with pytest.raises(ValueError, match="'amused' family"):
        engine.resolve(Request(prompt="a", family="amused"))
    with pytest.raises(ValueError, match="no image-to-image"):
        engine.resolve(Request(prompt="a", init_image=torch.rand(3, 64, 64), strength=0.5))
    with pytest.raises(TypeError, match="Request"):
        engine.submit({"prompt": "a"})
