"""``musefast.accelerate(pipe)`` on diffusers' own aMUSEd pipelines (diffusers: a test extra)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
scipy_stats = pytest.importorskip("scipy.stats")

import musefast  # noqa: E402
from amused_tiny import CODEBOOK, MASK_ID, make_tiny_amused  # noqa: E402
from musefast.compat.amused_accelerate import FusedAmusedStep  # noqa: E402
from musefast.compat.diffusers import MusefastAttnProcessor  # noqa: E402

PROMPTS = ["a photo of a cat", "red house"]


@pytest.fixture
def pipe(tmp_path):
    return make_tiny_amused(tmp_path, "512")


def _run(pipe, seed, **kw):
    counts = []

    def record(step, timestep, latents):
        counts.append((latents == MASK_ID).sum(dim=(1, 2)).tolist())

    out = pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), callback=record, **kw).images
    return out, counts


def test_attention_only_keeps_diffusers_results(pipe):
    before_tokens, _ = _run(pipe, 0, output_type="latent")
    before_images, _ = _run(pipe, 0, output_type="np")
    assert musefast.accelerate(pipe, fused_step=False) is pipe
    processors = pipe.transformer.attn_processors
    assert processors and all(isinstance(p, MusefastAttnProcessor) for p in processors.values())
    assert "step" not in pipe.scheduler.__dict__
    after_tokens, _ = _run(pipe, 0, output_type="latent")
    after_images, _ = _run(pipe, 0, output_type="np")
    assert torch.equal(after_tokens, before_tokens)
    assert abs(after_images - before_images).max() < 1e-4


def test_fused_step_follows_the_schedule(pipe):
    _, expected_counts = _run(pipe, 1, output_type="latent")
    musefast.accelerate(pipe)
    assert isinstance(pipe.scheduler.step, FusedAmusedStep)
    musefast.accelerate(pipe, step_backend="reference")  # again: only the backend changes
    assert pipe.scheduler.step.backend == "reference"
    tokens, counts = _run(pipe, 1, output_type="latent")
    assert counts == expected_counts  # the same mask counts at every step
    assert tokens.shape == (2, 8, 8) and int(tokens.max()) < CODEBOOK
    again, _ = _run(pipe, 1, output_type="latent")
    assert torch.equal(tokens, again)  # seeded by the generator
    images, _ = _run(pipe, 1, output_type="np", num_inference_steps=3)
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() <= images.max() <= 1


def test_accelerated_img2img_and_inpaint_pipelines(pipe):
    size = 32
    image = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, size, size)
    mask[:, 8:24, 4:20] = 1
    for cls, kw in ((diffusers.AmusedImg2ImgPipeline, dict(image=image, strength=0.6)),
                    (diffusers.AmusedInpaintPipeline, dict(image=image, mask_image=mask))):
        other = cls(vqvae=pipe.vqvae, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                    transformer=pipe.transformer, scheduler=diffusers.AmusedScheduler(mask_token_id=MASK_ID))
        other.set_progress_bar_config(disable=True)
        _, expected = _run(other, 2, output_type="latent", **kw)
        musefast.accelerate(other)
        tokens, counts = _run(other, 2, output_type="latent", **kw)
        if cls is diffusers.AmusedInpaintPipeline:
            assert counts == expected
            known = torch.ones_like(tokens, dtype=torch.bool)
            known[:, 2:6, 1:5] = False
            encoded = other.vqvae.quantize(other.vqvae.encode(image).latents)[2][2].view(2, 8, 8)
            assert torch.equal(tokens[known], encoded[known])
        assert len(counts) == len(expected) and counts[-1] == [0, 0]


def test_fused_step_samples_follow_softmax():
    """The last step fills every position with one draw from softmax(logits): chi-square at 1e-3."""
    sched = diffusers.AmusedScheduler(mask_token_id=MASK_ID)
    sched.set_timesteps(1)
    musefast.accelerate(type("Pipe", (), {"scheduler": sched})(), attention=False)
    row = torch.tensor([1.5, 0.5, 0.0, -1.0, 2.0, -0.5, 0.3, 1.0])
    logits = row[None, :, None, None].expand(4, -1, 32, 32).contiguous()  # (B, K, h, w)
    sample = torch.full((4, 32, 32), MASK_ID)
    out = sched.step(logits, sched.timesteps[0], sample, generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(out.prev_sample.flatten(), minlength=row.numel()).double()
    assert torch.equal(out.prev_sample, out.pred_original_sample)
    expected = torch.softmax(row.double(), 0) * counts.sum()
    assert scipy_stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_accelerate_refuses_other_objects():
    with pytest.raises(TypeError, match="needs a diffusers aMUSEd pipeline"):
        musefast.accelerate(object())


def test_set_default_attn_processor_restores_diffusers_attention(pipe):
    """diffusers' tests call transformer.set_default_attn_processor(); diffusers' own method
    refuses processors it does not list, so an accelerated transformer must answer it."""
    from diffusers.models.attention_processor import AttnProcessor

    musefast.accelerate(pipe)
    pipe.transformer.set_default_attn_processor()
    assert all(type(p) is AttnProcessor for p in pipe.transformer.attn_processors.values())
    musefast.accelerate(pipe)  # accelerating again swaps musefast's attention back in
    assert all(isinstance(p, MusefastAttnProcessor) for p in pipe.transformer.attn_processors.values())
