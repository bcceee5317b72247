"""The step cache on Meissonic / Monetico (tiny random models of tests/fixtures/meissonic).

Model level: a cheap forward that recomputes every row is the exact forward; one that recomputes
rows whose inputs did not change gives the recorded logits, at the right rotary positions; and it
really reads the record (tokens outside its cells do not reach it). Pipeline level: cache=None
is the sampler as it ran before the cache, refresh=1 equals it, a real cache setting changes
tokens and counts fewer transformer FLOPs, and img2img / inpainting / guidance intervals /
the compat sampler behave as AmusedPipeline's.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import musefast
from musefast import StepCache
from musefast.compat.amused_scheduler import choice_temperatures
from musefast.cpu import linear as cpu_engine
from musefast.models.meissonic import MeissonicTransformer
from musefast.nn.row_cache import KVStore, rows_from_mask
from musefast.sampling import MaskGitSampler

FIXTURES = Path(__file__).parent / "fixtures" / "meissonic"
PIPELINE = FIXTURES / "meissonic"
MODELS = {"meissonic": (PIPELINE / "transformer", PIPELINE), "monetico": (FIXTURES / "monetico",) * 2}


def _model(name: str):
    """The fixture transformer in float32 with every weight perturbed (a zero-initialised gate
    or norm would hide a wrong row), its prepared context and timestep, and its token grid."""
    folder, io_folder = MODELS[name]
    model = MeissonicTransformer.from_pretrained(folder, dtype=torch.float32).eval()
    cpu_engine.restore_weights(model)  # the perturbation below writes the weights in place
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    io = load_file(io_folder / "transformer_io.safetensors")
    ctx = model.prepare_context(io["encoder_hidden_states"], io["pooled_text_emb"], io["micro_conds"])
    return model, dict(context=ctx, timestep=io["timestep"]), io["tokens"].shape


def _tokens(model, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, model.config.codebook_size, shape, generator=gen)
    return t.masked_fill(torch.rand(shape, generator=gen) < 0.5, model.mask_token_id)


def _flat(logits):
    """(B, K, H, W) -> (B, H·W, K)."""
    return logits.permute(0, 2, 3, 1).reshape(logits.shape[0], -1, logits.shape[1])


def _at(flat, rows):
    return flat.gather(1, rows[..., None].expand(-1, -1, flat.shape[-1]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cheap_forward_of_all_rows_is_the_exact_forward(name):
    """Every image row and the text recomputed replace the whole record layer by layer: exact."""
    model, kw, shape = _model(name)
    old, new = _tokens(model, shape, 0), _tokens(model, shape, 1)
    store = KVStore()
    with torch.no_grad():
        recorded = model(old, kv_store=store, **kw)
        assert torch.equal(recorded, model(old, **kw))  # recording changes nothing
        B, N = shape[0], shape[1] * shape[2]
        rows = torch.arange(N).flip(0)[None].expand(B, -1).contiguous()  # any order
        cheap = model(new, kv_store=store, rows=rows, **kw)
        exact = _flat(model(new, **kw))
    torch.testing.assert_close(cheap, exact[:, rows[0]], atol=2e-5, rtol=2e-5)
    assert not torch.allclose(exact, _flat(recorded), atol=1e-2)  # the new tokens do change the logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cheap_forward_of_unchanged_rows_gives_the_recorded_logits(name):
    """Rows recomputed with unchanged inputs see the same K/V at their own rotary positions (a
    wrong position would turn their queries differently); padding rows and the other image of
    the batch do not disturb them."""
    model, kw, shape = _model(name)
    tokens = _tokens(model, shape, 2)
    store = KVStore()
    with torch.no_grad():
        full = _flat(model(tokens, kv_store=store, **kw))
        selected = torch.zeros(shape[0], shape[1] * shape[2], dtype=torch.bool)
        selected[0, [1, 6, 7, 13]] = True
        selected[1, [3]] = True
        rows = rows_from_mask(selected)
        cheap = model(tokens, kv_store=store, rows=rows, **kw)
    torch.testing.assert_close(cheap, _at(full, rows), atol=2e-5, rtol=2e-5)


def test_cheap_forward_reads_the_record_outside_its_cells():
    """Tokens outside the recomputed 2x2 cells reach a cheap forward only through the record:
    changing them changes nothing; changing a token inside a cell does (the cell is recomputed)."""
    model, kw, shape = _model("meissonic")
    tokens = _tokens(model, shape, 3)
    rows = torch.tensor([[0], [0]])  # token (0, 0): its cell is tokens (0, 0), (0, 1), (1, 0), (1, 1)
    outside, inside = tokens.clone(), tokens.clone()
    outside[:, 4:] = (outside[:, 4:] + 1) % model.config.codebook_size
    inside[:, 1, 1] = (inside[:, 1, 1] + 1) % model.config.codebook_size
    with torch.no_grad():
        store = KVStore()
        model(tokens, kv_store=store, **kw)
        base = model(tokens, kv_store=store, rows=rows, **kw)
        assert torch.equal(model(outside, kv_store=store, rows=rows, **kw), base)
        assert not torch.allclose(model(inside, kv_store=store, rows=rows, **kw), base)


def test_rows_need_a_record():
    model, kw, shape = _model("monetico")
    with pytest.raises(RuntimeError, match="full forward"), torch.no_grad():
        model(_tokens(model, shape, 0), kv_store=KVStore(), rows=torch.zeros(shape[0], 1, dtype=torch.long), **kw)


# -- pipeline -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return musefast.load(PIPELINE)


RUN = dict(prompt=["a red cat", "a dog on the left"], height=256, width=256, num_inference_steps=8, seed=3,
           output_type="tokens", progress=False)


def _before(pipe, prompt, height, width, num_inference_steps, seed, guidance_scale=9.0, **_):
    """The fused sampler as MeissonicPipeline ran it before the cache and the engine: a plain
    function running both branches at every step, through ``MaskGitSampler``."""
    steps = num_inference_steps
    pooled, hidden, B = pipe.encode_prompt(prompt, None, num_images_per_prompt=1, use_cfg=True)
    micro = torch.tensor([width, height, 0, 0, 6], dtype=hidden.dtype)
    context = pipe.transformer.prepare_context(hidden, pooled, micro)
    step = [0]

    def logits_of(tokens):
        out = pipe.transformer(torch.cat([tokens, tokens]), context=context,
                               timestep=torch.tensor([steps - 1 - step[0]]))
        step[0] += 1
        uncond, cond = _flat(out).chunk(2)
        return cond, uncond

    f = pipe.vae_scale_factor
    tokens = torch.full((B, height // f, width // f), pipe.mask_token_id)
    temps = choice_temperatures(steps, (2, 0))
    sampler = MaskGitSampler("amused", progress=False, num_steps=steps, guidance_scale=float(guidance_scale),
                             choice_temperature=(float(temps[0]), float(temps[-1])),
                             mask_schedule=pipe.masking_schedule)
    return sampler(logits_of, tokens, mask_token_id=pipe.mask_token_id, seed=seed)


def test_cache_off_and_refresh_1_give_the_tokens_of_before(pipe):
    before = _before(pipe, **RUN)
    assert torch.equal(pipe(**RUN), before)
    assert torch.equal(pipe(**RUN, cache=StepCache(refresh=1)), before)
    assert torch.equal(pipe(**RUN, cache=StepCache(refresh=1, recompute="lowest_confidence")), before)
    assert not torch.equal(pipe(**RUN, cache=StepCache(refresh=4, recompute="lowest_confidence")), before)


def test_refresh_1_is_exact_without_guidance(pipe):
    kw = dict(RUN, guidance_scale=1.0)  # no unconditional branch at all
    assert torch.equal(pipe(**kw, cache=StepCache(refresh=1)), pipe(**kw))


def _transformer_flops(pipe, **kw) -> tuple[torch.Tensor, int]:
    """Tokens and transformer FLOPs of one call, counted by torch's FlopCounterMode on the plain
    (not oneDNN-packed) linears and the reference attention, whose matmuls it sees."""
    pipe.transformer.set_backend("reference")
    try:
        with cpu_engine.plain(), FlopCounterMode(display=False) as counter:
            tokens = pipe(**kw)
    finally:
        pipe.transformer.set_backend(None)
    return tokens, int(sum(counter.get_flop_counts()["MeissonicTransformer"].values()))


def test_fast_cache_counts_fewer_flops_and_reports_its_agreement(pipe, record_property):
    kw = dict(RUN, height=512, width=512, num_inference_steps=12)  # 16x16 tokens, 8x8 cells
    exact, exact_flops = _transformer_flops(pipe, **kw)
    fast, fast_flops = _transformer_flops(pipe, **kw, cache="fast")
    interval, interval_flops = _transformer_flops(pipe, **kw, guidance_interval=(0.0, 0.5))
    agreement = float((fast == exact).float().mean())
    record_property("flop_reduction_fast", exact_flops / fast_flops)
    record_property("flop_reduction_interval_only", exact_flops / interval_flops)
    record_property("token_agreement_fast", agreement)
    print(f"\nMeissonic tiny, 512², 12 steps: fast {exact_flops / fast_flops:.3f}x fewer transformer FLOPs "
          f"(guidance interval alone {exact_flops / interval_flops:.3f}x), token agreement {agreement:.3f}")
    # the guidance interval runs 6 of 12 steps at half the batch: 24 / 18 of the forwards
    assert exact_flops / interval_flops == pytest.approx(24 / 18, rel=0.02)
    assert fast_flops < interval_flops  # the cheap steps save something on top
    assert 0.5 < agreement < 1.0


def test_guidance_interval_halves_the_batch(pipe):
    batches = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        pipe(**RUN, guidance_interval=(0.0, 0.5))
    finally:
        hook.remove()
    assert batches == [4] * 4 + [2] * 4


def test_no_kv_leak_between_images_or_calls(pipe):
    kw = dict(RUN, prompt=None, cache=StepCache(refresh=3))
    gen = torch.Generator().manual_seed(0)
    cfg = pipe.transformer.config
    hidden = torch.randn(3, 77, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(3, cfg.pooled_projection_dim, generator=gen)
    neg = dict(negative_encoder_hidden_states=torch.zeros(3, 77, cfg.joint_attention_dim),
               negative_prompt_embeds=torch.zeros(3, cfg.pooled_projection_dim))
    a = pipe(encoder_hidden_states=hidden, prompt_embeds=pooled, **neg, **kw)
    other = torch.randn(3, 77, cfg.joint_attention_dim, generator=gen)
    b = pipe(encoder_hidden_states=torch.cat([hidden[:1], other[1:]]), prompt_embeds=pooled, **neg, **kw)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])
    assert torch.equal(pipe(encoder_hidden_states=hidden, prompt_embeds=pooled, **neg, **kw), a)


def test_image_to_image_and_inpainting_with_the_cache(pipe):
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    kw = dict(prompt="a dog", image=image, num_inference_steps=6, seed=1, output_type="tokens", progress=False)
    exact = pipe(**kw)
    assert torch.equal(pipe(**kw, cache=StepCache(refresh=1)), exact)
    assert pipe(**kw, cache="fast").shape == exact.shape
    mask = torch.zeros(1, 256, 256)
    mask[:, :, :128] = 1  # repaint the left half
    known = pipe.encode(image)
    for cache in ("fast", StepCache(refresh=2)):
        out = pipe(**kw, mask_image=mask, cache=cache)
        assert torch.equal(out[..., 4:], known[..., 4:])


def test_compat_sampler_refuses_the_cache(pipe):
    with pytest.raises(ValueError, match="fused"):
        pipe(**RUN, sampler="compat", cache="fast")
    with pytest.raises(ValueError, match="fused"):
        pipe(**RUN, sampler="compat", guidance_interval=(0.0, 0.5))
    with pytest.raises(ValueError, match="cache must be"):
        pipe(**RUN, cache="slow")
