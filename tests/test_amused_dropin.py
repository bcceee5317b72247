"""musefast's aMUSEd pipelines built from diffusers' own component objects (the drop-in at the API)."""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import musefast  # noqa: E402
from amused_tiny import make_tiny_amused  # noqa: E402

FAST = dict(num_inference_steps=3, output_type="np", height=64, width=64)


@pytest.fixture(scope="module")
def theirs(tmp_path_factory):
    return make_tiny_amused(tmp_path_factory.mktemp("amused"))


def test_built_from_diffusers_components_follows_diffusers_conventions(theirs, tmp_path):
    pipe = musefast.AmusedPipeline(**theirs.components)
    assert set(pipe.components) == set(theirs.components)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", generator=torch.Generator().manual_seed(0), **FAST)
    images = out[0]  # diffusers: the output object's first field is the images
    assert images.shape == (1, 64, 64, 3) and out.images is images
    (again,) = pipe("a cat", generator=torch.Generator().manual_seed(0), return_dict=False, **FAST)
    assert np.array_equal(images, again)
    pipe.save_pretrained(tmp_path)
    loaded = musefast.AmusedPipeline.from_pretrained(tmp_path, dtype=None)
    assert np.array_equal(images, loaded("a cat", generator=torch.Generator().manual_seed(0), **FAST).images)
    # and diffusers loads what musefast saved
    peer = diffusers.AmusedPipeline.from_pretrained(tmp_path)
    assert set(peer.components) == set(theirs.components)


def test_to_positional_and_step_end_callback(theirs):
    pipe = musefast.AmusedPipeline(**theirs.components).to("cpu", torch.float32)
    pipe.enable_attention_slicing()  # documented no-op

    def zero_last(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == p.num_timesteps - 1 else kwargs

    tokens = pipe("a cat", seed=0, callback_on_step_end=zero_last, progress=False,
                  **{**FAST, "output_type": "latent"})[0]
    assert tokens.abs().sum() == 0
    with pytest.raises(ValueError, match="not available"):
        pipe("a cat", seed=0, callback_on_step_end=zero_last, callback_on_step_end_tensor_inputs=["noise"], **FAST)


def test_edit_pipelines_need_their_images(theirs):
    img2img = musefast.AmusedImg2ImgPipeline(**theirs.components)
    with pytest.raises(ValueError, match="needs image="):
        img2img("a cat")
    image = torch.rand(1, 3, 64, 64)
    assert img2img("a cat", image, seed=0, progress=False, num_inference_steps=2, output_type="np")[0].shape \
        == (1, 64, 64, 3)


def test_encode_prompt_still_answers_on_instances_with_a_deprecation(theirs):
    """encode_text is the name; the earlier encode_prompt answers on instances (not on the class,
    where diffusers' tester would read it as its own encode_prompt contract)."""
    assert not hasattr(musefast.AmusedPipeline, "encode_prompt")
    pipe = musefast.AmusedPipeline(**theirs.components)
    with pytest.warns(DeprecationWarning, match="encode_text"):
        old = pipe.encode_prompt(["a cat"], use_cfg=True)
    new = pipe.encode_text(["a cat"], use_cfg=True)
    assert all(torch.equal(a, b) for a, b in zip(old[:2], new[:2]))
    with pytest.raises(AttributeError, match="no_such_thing"):
        pipe.no_such_thing
