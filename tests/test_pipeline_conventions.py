"""Every pipeline speaks diffusers' conventions: guidance <= 1 = no CFG, diffusers' argument
names, output objects, ``to()``, numpy and per-image seeds, a list of generators, progress-bar
config, one-line errors, save/load; MusePipeline's resizing. The first tests cover MusePipeline;
the last group runs the same checks over tiny Muse, aMUSEd and Meissonic pipelines."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import musefast
from musefast.models.text import load_text_encoder
from musefast.pipelines.random_init import random_pipeline
from musefast.sampling import MaskGitSampler
from tiny_text import make_tiny_t5

FAST = dict(num_steps=3, progress=False)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    t5 = load_text_encoder(make_tiny_t5(tmp_path_factory.mktemp("t5")))
    return random_pipeline("tiny", text_encoder=t5)


def _forward_batches(pipe, call):
    """The batch sizes the base transformer saw during ``call()``."""
    seen = []
    handle = pipe.transformer.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    try:
        result = call()
    finally:
        handle.remove()
    return seen, result


@pytest.mark.parametrize("g", [0.0, 0.5, 1.0])
def test_guidance_at_most_one_is_one_branch_and_the_same_image(pipe, g):
    seen, tokens = _forward_batches(pipe, lambda: pipe("a red cat", seed=3, guidance_scale=g, output_type="tokens",
                                                       **FAST))
    assert set(seen) == {1}  # the conditional branch alone: half the work of CFG
    assert torch.equal(tokens, pipe("a red cat", seed=3, guidance_scale=1.0, output_type="tokens", **FAST))
    seen, _ = _forward_batches(pipe, lambda: pipe("a red cat", seed=3, guidance_scale=2.0, output_type="tokens",
                                                  **FAST))
    assert set(seen) == {2}  # guidance on: both branches in one forward


@pytest.mark.parametrize("g", [-1.0, math.nan, math.inf])
def test_negative_or_non_finite_guidance_is_an_error(pipe, g):
    with pytest.raises(ValueError, match="finite number >= 0"):
        pipe("a cat", guidance_scale=g, **FAST)
    with pytest.raises(ValueError, match="finite number >= 0"):
        pipe.edit(np.zeros((32, 32, 3), np.uint8), "a cat", guidance_scale=g, iterations=1, progress=False)
    for preset in ("maskgit", "amused", "lucidrains"):
        with pytest.raises(ValueError, match="finite number >= 0"):
            MaskGitSampler(preset, guidance_scale=g)


@pytest.mark.parametrize("preset", ["maskgit", "amused", "lucidrains"])
def test_every_preset_ignores_the_unconditional_branch_at_guidance_one_or_less(preset):
    torch.manual_seed(0)
    cond, uncond = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    tokens = torch.full((1, 16), 32, dtype=torch.long)
    run = lambda g, out: MaskGitSampler(preset, num_steps=4, guidance_scale=g, progress=False)(  # noqa: E731
        lambda t: out, tokens, mask_token_id=32, seed=1)
    assert torch.equal(run(0.5, (cond, uncond)), run(1.0, cond))
    assert not torch.equal(run(4.0, (cond, uncond)), run(1.0, cond))


def test_diffusers_argument_names(pipe):
    ours = pipe("a cat", seed=5, num_steps=3, output_type="tokens", progress=False)
    theirs = pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="tokens",
                  progress=False)
    drawn = torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(0))
    assert torch.equal(theirs, pipe("a cat", seed=int(drawn), num_steps=3, output_type="tokens", progress=False))
    assert torch.equal(ours, pipe("a cat", seed=np.int64(5), num_inference_steps=3, output_type="tokens",
                                  progress=False))
    with pytest.raises(ValueError, match="seed or generator"):
        pipe("a cat", seed=1, generator=torch.Generator(), **FAST)
    with pytest.raises(ValueError, match="num_steps or num_inference_steps"):
        pipe("a cat", num_steps=2, num_inference_steps=3, progress=False)


def test_output_objects(pipe):
    images = pipe("a cat", seed=0, **FAST)
    assert isinstance(images[0], Image.Image) and images.images is images
    out = pipe("a cat", seed=0, return_dict=True, **FAST)
    assert isinstance(out.images[0], Image.Image)
    (arr,) = pipe("a cat", seed=0, output_type="np", return_dict=False, **FAST)
    assert arr.shape == (1, 32, 32, 3)


def test_to_device_and_dtype(pipe):
    assert pipe.to(torch.float64).dtype == torch.float64
    assert pipe.to("cpu", torch.float32).dtype == torch.float32 and pipe.device.type == "cpu"
    with pytest.raises(TypeError, match="floating torch.dtype"):
        pipe.to(torch.int8)
    with pytest.raises(ValueError, match="not a device"):
        pipe.to("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pipe.to("cuda")
        with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
            pipe.enable_model_cpu_offload()


def test_progress_bar_config(pipe, capfd):
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe("a cat", seed=0, num_steps=3)
        assert "decoding" not in capfd.readouterr().err
    finally:
        pipe.set_progress_bar_config()
    pipe("a cat", seed=0, num_steps=3)
    assert "decoding" in capfd.readouterr().err


def test_resize_any_size(pipe):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))  # 50×30
    mask = Image.fromarray(np.pad(np.full((30, 25), 255, np.uint8), ((0, 0), (0, 25))))
    with pytest.raises(ValueError, match=r"image is 50×30 \(width×height\).*resize=True"):
        pipe.inpaint(image, mask, "a cat", seed=0, **FAST)
    assert pipe.inpaint(image, mask, "a cat", seed=0, resize=True, **FAST)[0].size == (50, 30)
    assert pipe.edit(image, "a cat", iterations=2, seed=0, resize=True, progress=False)[0].size == (50, 30)
    with pytest.raises(ValueError, match=r"is 66×30, but this model works at 32×32"):
        pipe.outpaint(image, "a tree", left=16, seed=0, **FAST)
    assert pipe.outpaint(image, "a tree", left=16, seed=0, resize=True, **FAST)[0].size == (66, 30)


# -- one suite over every pipeline family: tiny Muse, aMUSEd and Meissonic --------------------------

MEISSONIC = Path(__file__).parent / "fixtures" / "meissonic" / "meissonic"
SIZE = {"muse": {}, "amused": {}, "meissonic": {"height": 64, "width": 64}}  # Meissonic's default is 1024²


@pytest.fixture(scope="module", params=["muse", "amused", "meissonic"])
def family(request, tmp_path_factory, pipe):
    """(name, pipeline, the keyword arguments of a fast call)."""
    if request.param == "muse":
        model = pipe
    elif request.param == "amused":
        pytest.importorskip("diffusers")
        from amused_tiny import make_tiny_amused

        folder = tmp_path_factory.mktemp("amused")
        make_tiny_amused(folder)
        model = musefast.AmusedPipeline.from_pretrained(folder, dtype=None)
    else:
        model = musefast.load(MEISSONIC, dtype=None)
    return request.param, model, dict(num_inference_steps=3, **SIZE[request.param])


def _tokens(model, prompt, **kw):
    return model(prompt, output_type="tokens", progress=False, return_dict=False, **kw)[0]


def test_every_pipeline_takes_diffusers_argument_names_and_seeds(family):
    _, model, kw = family
    drawn = torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_tokens(model, "a cat", generator=torch.Generator().manual_seed(0), **kw),
                       _tokens(model, "a cat", seed=int(drawn), **kw))
    assert torch.equal(_tokens(model, "a cat", seed=np.int64(5), **kw), _tokens(model, "a cat", seed=5, **kw))
    with pytest.raises(ValueError, match="seed or generator"):
        _tokens(model, "a cat", seed=1, generator=torch.Generator(), **kw)


def test_every_pipeline_gives_each_image_its_own_seed(family):
    """Per-image seeds (and diffusers' list of generators): an image's tokens are those of its solo run."""
    _, model, kw = family
    prompts = ["a cat", "a red dog"]
    solo = torch.cat([_tokens(model, p, seed=s, **kw) for p, s in zip(prompts, (7, 8))])
    assert torch.equal(_tokens(model, prompts, seed=[7, 8], **kw), solo)
    generators = [torch.Generator().manual_seed(i) for i in (1, 2)]
    seeds = [int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(i))) for i in (1, 2)]
    assert torch.equal(_tokens(model, prompts, generator=generators, **kw), _tokens(model, prompts, seed=seeds, **kw))


def test_every_pipeline_returns_diffusers_output_objects(family):
    _, model, kw = family
    images = model("a cat", seed=0, progress=False, **kw)
    assert isinstance(images[0], Image.Image) and images.images is images
    out = model("a cat", seed=0, progress=False, return_dict=True, **kw)
    assert isinstance(out.images[0], Image.Image)
    (arr,) = model("a cat", seed=0, output_type="np", progress=False, return_dict=False, **kw)
    assert arr.ndim == 4 and arr.shape[0] == 1 and arr.shape[-1] == 3 and arr.images is arr


def test_every_pipeline_honours_the_progress_bar_config(family, capfd):
    _, model, kw = family
    model.set_progress_bar_config(disable=True)
    try:
        model("a cat", seed=0, output_type="tokens", **kw)
        assert "decoding" not in capfd.readouterr().err
    finally:
        model.set_progress_bar_config()
    model("a cat", seed=0, output_type="tokens", **kw)
    assert "decoding" in capfd.readouterr().err


def test_every_pipeline_moves_with_to(family):
    _, model, _ = family
    assert model.to("cpu", torch.float32).dtype == torch.float32 and model.device.type == "cpu"
    assert model.to(dtype=torch.float32).to(torch.device("cpu")).dtype == torch.float32
    with pytest.raises(TypeError, match="floating torch.dtype"):
        model.to(torch.int8)
    with pytest.raises(ValueError, match="not a device"):
        model.to("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
            model.enable_model_cpu_offload()


@pytest.mark.parametrize("g", [0.0, 1.0])
def test_every_pipeline_runs_one_branch_at_guidance_one_or_less(family, g):
    _, model, kw = family
    seen, tokens = _forward_batches(model, lambda: _tokens(model, "a cat", seed=3, guidance_scale=g, **kw))
    assert set(seen) == {1}
    assert torch.equal(tokens, _tokens(model, "a cat", seed=3, guidance_scale=1.0, **kw))
    seen, _ = _forward_batches(model, lambda: _tokens(model, "a cat", seed=3, guidance_scale=3.0, **kw))
    assert set(seen) == {2}


@pytest.mark.parametrize("bad, match", [
    (dict(num_inference_steps=0), "num_inference_steps|num_steps"),
    (dict(output_type="bmp"), "output_type"),
    (dict(prompt=[]), "prompt"),
    (dict(seed=-1), "seed"),
])
def test_every_pipeline_rejects_bad_input_in_one_line(family, bad, match):
    _, model, kw = family
    kw = {**kw, "prompt": "a cat", "seed": 0, "progress": False, **bad}
    with pytest.raises((TypeError, ValueError), match=match) as info:
        model(**kw)
    assert "\n" not in str(info.value)


def test_every_pipeline_saves_and_loads_back(family, tmp_path):
    name, model, kw = family
    model.save_pretrained(tmp_path)
    loaded = musefast.load(tmp_path, dtype=None)
    assert type(loaded) is type(model)
    assert torch.equal(_tokens(loaded, "a cat", seed=4, **kw), _tokens(model, "a cat", seed=4, **kw))


def test_every_pipeline_calls_callback_on_step_end_and_takes_its_latents(family):
    """diffusers' step callback: called once per step with the token grid; the latents it returns
    replace the tokens (a drift between the pipelines used to leave it out of Meissonic and Muse)."""
    _, model, kw = family
    seen = []

    def keep(pipe, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        return {}

    tokens = _tokens(model, "a cat", seed=2, callback_on_step_end=keep, **kw)
    assert [i for i, _ in seen] == list(range(len(seen))) and len(seen) >= 3
    assert seen[-1][1] == tuple(tokens.shape)  # (1, h, w): the grid of the last stage
    assert torch.equal(tokens, _tokens(model, "a cat", seed=2, **kw))  # a callback returning nothing changes nothing

    def freeze_corner(pipe, i, t, tensors):
        latents = tensors["latents"].clone()
        latents[:, 0, 0] = 1
        return {"latents": latents}

    frozen = _tokens(model, "a cat", seed=2, callback_on_step_end=freeze_corner, **kw)
    assert int(frozen[0, 0, 0]) == 1
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        _tokens(model, "a cat", seed=2, callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["x"], **kw)


def test_every_pipeline_offers_components_progress_bar_and_attention_slicing(family):
    """What diffusers' pipelines offer besides the call, on every family: ``components`` rebuilds the
    pipeline, ``progress_bar`` follows the config, attention slicing is accepted and changes nothing."""
    _, model, kw = family
    components = model.components
    assert components and all(isinstance(k, str) for k in components)
    rebuilt = type(model)(**components)
    assert torch.equal(_tokens(rebuilt, "a cat", seed=6, **kw), _tokens(model, "a cat", seed=6, **kw))
    before = _tokens(model, "a cat", seed=6, **kw)
    model.enable_attention_slicing()
    try:
        assert torch.equal(_tokens(model, "a cat", seed=6, **kw), before)
    finally:
        model.disable_attention_slicing()
    model.set_progress_bar_config(disable=True)
    try:
        assert list(model.progress_bar(range(3))) == [0, 1, 2]
    finally:
        model.set_progress_bar_config()
