"""AmusedPipeline against diffusers' aMUSEd pipelines (diffusers: a test extra).

A tiny random aMUSEd folder is built offline and saved with diffusers' ``save_pretrained``;
musefast loads the folder, diffusers keeps its objects. ``sampler="compat"`` must give the
same tokens as diffusers' AmusedPipeline / AmusedImg2ImgPipeline / AmusedInpaintPipeline for
the same generator seed; ``sampler="fused"`` must follow the same schedule (mask counts per
step) and the same distribution (chi-square tests with fixed seeds: deterministic, with a
stated false-alarm rate for a correct sampler).
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
scipy_stats = pytest.importorskip("scipy.stats")

from amused_tiny import CODEBOOK, MASK_ID, make_tiny_amused  # noqa: E402
from musefast.pipelines.amused import AmusedPipeline, AmusedPipelineOutput, diffusers_token_mask  # noqa: E402

PROMPTS = ["a photo of a cat", "red house on the tree"]


def _diffusers_variant(pipe, cls):
    """Another diffusers aMUSEd pipeline over the same components, with its own scheduler (the
    inpaint pipeline switches its scheduler to the linear schedule)."""
    scheduler = diffusers.AmusedScheduler(mask_token_id=MASK_ID)
    other = cls(vqvae=pipe.vqvae, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                transformer=pipe.transformer, scheduler=scheduler)
    other.set_progress_bar_config(disable=True)
    return other


@pytest.fixture(scope="module", params=["256", "512"])
def pipes(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"amused{request.param}")
    theirs = make_tiny_amused(folder, request.param)
    ours = AmusedPipeline.from_pretrained(folder, sampler="compat")
    return theirs, ours


@pytest.fixture(scope="module")
def pipes256(tmp_path_factory):
    folder = tmp_path_factory.mktemp("amused256_fused")
    theirs = make_tiny_amused(folder, "256")
    return theirs, AmusedPipeline.from_pretrained(folder)


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# -- compat: the same tokens as diffusers ------------------------------------------------------


@pytest.mark.parametrize("case", [
    dict(),
    dict(negative_prompt=["blue", "a dog"], num_images_per_prompt=2, micro_conditioning_aesthetic_score=5,
         micro_conditioning_crop_coord=(1, 2)),
    dict(guidance_scale=1.0, temperature=3, num_inference_steps=5),
])
def test_compat_text_to_image_tokens_equal_diffusers(pipes, case):
    theirs, ours = pipes
    runs = []
    for seed in (0, 1):
        expected = theirs(PROMPTS, generator=_gen(seed), output_type="latent", **case).images
        got = ours(PROMPTS, generator=_gen(seed), output_type="latent", progress=False, **case)
        assert torch.equal(got, expected), (seed, int((got != expected).sum()))
        runs.append(got)
    assert not torch.equal(runs[0], runs[1])  # the tokens do depend on the seed
    assert torch.equal(ours(PROMPTS, seed=1, output_type="latent", progress=False, **case), runs[1])


def test_compat_images_equal_diffusers(pipes):
    theirs, ours = pipes
    expected = theirs(PROMPTS[0], generator=_gen(3), output_type="np").images
    got = ours(PROMPTS[0], generator=_gen(3), output_type="np", progress=False)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5
    pil = ours(PROMPTS[0], generator=_gen(3), progress=False)
    assert np.array_equal(np.asarray(pil[0]), np.asarray(theirs(PROMPTS[0], generator=_gen(3)).images[0]))


@pytest.mark.parametrize("strength,n", [(0.5, 1), (0.8, 2)])
def test_compat_image_to_image_tokens_equal_diffusers(pipes, strength, n):
    theirs, ours = pipes
    img2img = _diffusers_variant(theirs, diffusers.AmusedImg2ImgPipeline)
    size = ours.image_size
    image = _images(2, size, seed=5)
    expected = img2img(PROMPTS, image=image, strength=strength, num_images_per_prompt=n, generator=_gen(7),
                       output_type="latent").images
    got = ours(PROMPTS, image=image, strength=strength, num_images_per_prompt=n, generator=_gen(7),
               output_type="latent", progress=False)
    assert torch.equal(got, expected), int((got != expected).sum())


def _pil_mask(size):
    mask = np.zeros((size, size, 3), dtype=np.uint8)
    mask[size // 4: size // 2 + 3, 1: size - 5] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize("mask_kind,strength", [("pil", None), ("tensor", 0.7)])
def test_compat_inpaint_tokens_equal_diffusers(pipes, mask_kind, strength):
    theirs, ours = pipes
    inpaint = _diffusers_variant(theirs, diffusers.AmusedInpaintPipeline)
    size = ours.image_size
    image = [Image.fromarray((np.asarray(_images(1, size, s)[0].permute(1, 2, 0)) * 255).astype(np.uint8))
             for s in (11, 12)]
    mask = [_pil_mask(size)] * 2  # diffusers wants one mask per image
    if mask_kind == "tensor":
        mask = torch.from_numpy(np.asarray(mask[0])[..., 0] / 255.0).float()[None].repeat(2, 1, 1)
    kw = {} if strength is None else dict(strength=strength)
    expected = inpaint(PROMPTS, image=image, mask_image=mask, generator=_gen(9), output_type="latent", **kw).images
    got = ours(PROMPTS, image=image, mask_image=mask, generator=_gen(9), output_type="latent", progress=False, **kw)
    assert torch.equal(got, expected), int((got != expected).sum())
    known = ~diffusers_token_mask(mask, *got.shape[1:])
    assert 0 < int(known.sum()) < known.numel()
    assert torch.equal(got[known], ours.encode(image)[known])  # unmasked tokens are kept


# -- fused: the same schedule and distribution ----------------------------------------------------


def _mask_counts(run):
    counts = []
    run(lambda step, timestep, latents: counts.append((latents == MASK_ID).sum(dim=(1, 2)).tolist()))
    return counts


@pytest.mark.parametrize("mode", ["text2image", "img2img", "inpaint"])
def test_fused_follows_the_diffusers_schedule(pipes256, mode):
    theirs, ours = pipes256
    size = ours.image_size
    kw = dict(num_inference_steps=8, output_type="latent")
    if mode == "img2img":
        theirs = _diffusers_variant(theirs, diffusers.AmusedImg2ImgPipeline)
        kw.update(image=_images(2, size, 1), strength=0.75)
    elif mode == "inpaint":
        theirs = _diffusers_variant(theirs, diffusers.AmusedInpaintPipeline)
        kw.update(image=_images(2, size, 1), mask_image=[_pil_mask(size)] * 2)
    expected = _mask_counts(lambda cb: theirs(PROMPTS, generator=_gen(0), callback=cb, **kw))
    got = _mask_counts(lambda cb: ours(PROMPTS, seed=0, callback=cb, progress=False, **kw))
    assert len(got) == len(expected) and got[-1] == [0, 0]
    if mode != "img2img":
        assert got == expected
    else:  # the starting masks are random draws; after them, both follow the same count rule
        T, N = 8, 16
        for counts in (got, expected):
            for i, (before, after) in enumerate(zip(counts[:-2], counts[1:-1])):
                step = T - len(counts) + i + 1
                rule = int(torch.floor(N * torch.cos(torch.tensor((step + 1) / T) * math.pi / 2)))
                assert after == [max(1, min(b - 1, rule)) for b in before], (counts, step)


def test_fused_is_seeded_and_keeps_known_tokens(pipes256):
    _, ours = pipes256
    a = ours(PROMPTS, seed=3, output_type="latent", progress=False)
    assert torch.equal(a, ours(PROMPTS, seed=3, output_type="latent", progress=False))
    assert not torch.equal(a, ours(PROMPTS, seed=4, output_type="latent", progress=False))
    size = ours.image_size
    image = _images(1, size, 2)
    mask = torch.zeros(size, size)
    mask[5, 9] = 1.0  # one pixel: musefast's rule repaints its whole token, diffusers' resize drops it
    out = ours.inpaint(image, mask, PROMPTS[0], seed=1, output_type="latent", progress=False)
    known = ours.encode(image)
    f = ours.vae_scale_factor
    repaint = torch.zeros_like(known, dtype=torch.bool)
    repaint[0, 5 // f, 9 // f] = True
    assert torch.equal(out[~repaint], known[~repaint])
    assert not bool(diffusers_token_mask(mask, size // f, size // f).any())


def test_fused_one_step_samples_follow_the_model(pipes256):
    """T = 1: every token is one draw from softmax(guided logits). Chi-square over all 16
    positions (cells with expected count < 5 pooled per position); false-alarm rate 1e-3."""
    _, ours = pipes256
    n = 300
    tokens = ours(PROMPTS[0], num_inference_steps=1, num_images_per_prompt=n, seed=11, output_type="latent",
                  progress=False)
    pooled, hidden, _ = ours.encode_text(PROMPTS[0], use_cfg=True)
    context = ours.transformer.prepare_context(hidden, pooled, torch.tensor([16.0, 16.0, 0.0, 0.0, 6.0]))
    full = torch.full((2, 4, 4), MASK_ID)
    with torch.no_grad():
        uncond, cond = ours.transformer(full, context=context).double().chunk(2)
    p = torch.softmax(uncond + 10.0 * (cond - uncond), dim=-1)[0].reshape(16, CODEBOOK)
    stat, dof = 0.0, 0
    for pos in range(16):
        counts = torch.bincount(tokens.reshape(n, 16)[:, pos], minlength=CODEBOOK).double()
        expected = p[pos] * n
        small = expected < 5
        obs = torch.cat([counts[~small], counts[small].sum()[None]])
        exp = torch.cat([expected[~small], expected[small].sum()[None]])
        keep = exp > 0
        stat += float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
        dof += int(keep.sum()) - 1
    assert scipy_stats.chi2.sf(stat, dof) > 1e-3, (stat, dof)


def test_fused_matches_diffusers_in_distribution(pipes256):
    """12 steps: the final-token histograms of fused musefast and diffusers (pooled over
    positions and 96 images each) pass a chi-square homogeneity test at 1e-3."""
    theirs, ours = pipes256
    n = 96
    expected = theirs(PROMPTS[0], num_images_per_prompt=n, generator=_gen(21), output_type="latent").images
    got = ours(PROMPTS[0], num_images_per_prompt=n, seed=21, output_type="latent", progress=False)
    table = torch.stack([torch.bincount(x.flatten(), minlength=CODEBOOK) for x in (got, expected)]).numpy()
    table = table[:, table.sum(0) > 0]
    assert scipy_stats.chi2_contingency(table).pvalue > 1e-3, table


# -- arguments ----------------------------------------------------------------------------------


def test_outputs_and_argument_errors(pipes256):
    _, ours = pipes256
    kw = dict(num_inference_steps=2, seed=0, progress=False)
    out = ours(PROMPTS[0], return_dict=True, **kw)
    assert isinstance(out, AmusedPipelineOutput) and isinstance(out.images[0], Image.Image)
    (images,) = ours(PROMPTS[0], return_dict=False, output_type="pt", **kw)
    assert images.shape == (1, 3, 16, 16) and 0 <= float(images.min()) <= float(images.max()) <= 1
    assert ours(PROMPTS[0], output_type="tokens", height=32, width=16, **kw).shape == (1, 8, 4)
    emb = ours.text_encoder.encode(PROMPTS)
    direct = ours(prompt_embeds=emb.pooled, encoder_hidden_states=emb.hidden, output_type="latent", **kw)
    assert torch.equal(direct, ours(PROMPTS, output_type="latent", **kw))
    with pytest.raises(ValueError, match="strength applies to image-to-image"):
        ours(PROMPTS[0], strength=0.5, **kw)
    with pytest.raises(ValueError, match="sampler must be one of"):
        ours(PROMPTS[0], sampler="fast", **kw)
    with pytest.raises(ValueError, match="pass seed or generator, not both"):
        ours(PROMPTS[0], generator=_gen(0), **kw)
    with pytest.raises(ValueError, match="both prompt_embeds and encoder_hidden_states"):
        ours(prompt_embeds=emb.pooled, **kw)
    with pytest.raises(ValueError, match="runs int"):
        ours(PROMPTS[0], image=_images(1, 16, 0), strength=0.05, **kw)
    with pytest.raises(ValueError, match="guidance_schedule must be 'constant'"):
        ours(PROMPTS[0], sampler="compat", guidance_schedule="linear", **kw)
