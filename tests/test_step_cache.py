"""The step cache (musefast.sampling.cache, musefast.nn.row_cache) and the guidance options.

Cheap forwards are checked against full ones (all rows recomputed = the exact forward; no
input changed = the recorded logits), the sampler against the exact sampler (cache off and
refresh=1 give identical tokens), and the cache's isolation and memory are measured.
"""
import math

import pytest
import torch

import musefast
from musefast import ops
from musefast.models.transformer import MuseTransformer, MuseTransformerConfig, SuperResConfig, SuperResTransformer
from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.nn.row_cache import KVStore, gather_rows, rows_from_mask, scatter_head_rows_
from musefast.pipelines.random_init import random_pipeline
from musefast.sampling import GuidedForward, MaskGitSampler, StepCache, guidance_scale_at
from musefast.sampling.cache import resolve_cache

TEXT = 16


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised norms or GRN would hide wrong rows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _muse(**kw):
    cfg = dict(codebook_size=37, grid_size=4, dim=32, depth=2, num_heads=2, text_dim=TEXT)
    cfg.update(kw)
    return _perturb(MuseTransformer(MuseTransformerConfig(**cfg)))


def _uvit(downsample=False):
    cfg = UVit2DConfig(hidden_size=32, cond_embed_dim=8, micro_cond_encode_dim=4, micro_cond_embed_dim=20,
                       encoder_hidden_size=TEXT, vocab_size=40, codebook_size=32, in_channels=16,
                       block_out_channels=16, num_res_blocks=1, block_num_heads=2, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=48, sample_size=4,
                       downsample=downsample, upsample=downsample)
    return _perturb(UVit2D(cfg))


def _cases():
    """(name, model, context factory(B), tokens grid) for every model the cache supports."""
    gen = torch.Generator().manual_seed(1)
    text = lambda B: torch.randn(B, 5, TEXT, generator=gen)  # noqa: E731
    mask = lambda B: torch.arange(5)[None].expand(B, -1) < torch.tensor([5, 3, 4][:B])[:, None]  # noqa: E731
    cases = []
    for name, kw in {"text": {}, "rms_qk_post": dict(norm="rmsnorm", qk_norm=True, post_norm=True),
                     "null_kv_l2": dict(null_kv=True, qk_norm="l2", attn_scale=2.0),
                     "bert_post": dict(norm_position="post", embed_norm=True, gelu_approximate="tanh")}.items():
        m = _muse(**kw)
        cases.append((name, m, lambda B, m=m: dict(context=m.prepare_context(text(B), mask(B))), (4, 4)))
    cls = _muse(text_dim=None, num_classes=5)
    cases.append(("class", cls, lambda B: dict(class_labels=torch.arange(B) % 6), (4, 4)))
    sr = _perturb(SuperResTransformer(SuperResConfig(
        high=MuseTransformerConfig(codebook_size=37, grid_size=4, dim=32, depth=2, num_heads=2, text_dim=TEXT),
        low_codebook_size=11, low_grid_size=2, encoder_depth=1)))
    cases.append(("super_res", sr, lambda B: dict(context=sr.prepare_context(
        torch.randint(0, 11, (B, 4), generator=gen), text(B), mask(B))), (4, 4)))
    for down in (False, True):
        u = _uvit(down)
        cases.append((f"uvit{'_down' if down else ''}", u, lambda B, u=u: dict(context=u.prepare_context(
            text(B), torch.randn(B, 8, generator=gen), torch.tensor([64.0, 64, 0, 0, 6]))), (4, 4)))
    return cases


CASES = _cases()


def _tokens(model, B, grid, seed):
    gen = torch.Generator().manual_seed(seed)
    K = model.config.codebook_size if hasattr(model.config, "codebook_size") else model.config.high.codebook_size
    t = torch.randint(0, K, (B, *grid), generator=gen)
    return t.masked_fill(torch.rand(t.shape, generator=gen) < 0.5, model.mask_token_id)


def _flat(logits):
    return logits.reshape(logits.shape[0], -1, logits.shape[-1])


# -- building blocks -----------------------------------------------------------------------

def test_rows_from_mask_pads_with_the_images_own_position():
    sel = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    rows = rows_from_mask(sel)
    assert rows.tolist() == [[1, 3, 4], [2, 2, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="selected"):
        rows_from_mask(sel.int())


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_attention_of_gathered_rows_equals_rows_of_full_attention(backend):
    """A cheap step's attention (rows' queries against all keys) against its definition."""
    gen = torch.Generator().manual_seed(0)
    B, H, L, D = 3, 2, 37, 16
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    keep = torch.rand(B, L, generator=gen) > 0.3
    rows = rows_from_mask(torch.rand(B, L, generator=gen) > 0.6)
    idx = rows[:, None, :, None].expand(B, H, rows.shape[1], D)
    try:
        out = ops.attention(q.gather(2, idx), k, v, key_padding_mask=keep, backend=backend)
    except ops.BackendUnavailableError as exc:
        pytest.skip(str(exc))
    want = ops.attention(q, k, v, key_padding_mask=keep, backend="reference").gather(2, idx)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_scatter_of_rows_into_recorded_keys_matches_a_loop():
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(2, 3, 6, 4, generator=gen)
    rows = torch.tensor([[5, 1], [2, 2]])
    new = torch.randn(2, 3, 2, 4, generator=gen)
    want = K.clone()
    for b in range(2):
        for j in range(2):
            want[b, :, rows[b, j]] = new[b, :, j]
    new[1, :, 1] = new[1, :, 0]  # a padded row repeats its image's own row
    want[1, :, 2] = new[1, :, 0]
    torch.testing.assert_close(scatter_head_rows_(K.clone(), rows, new), want, atol=0, rtol=0)
    x = torch.randn(2, 6, 5, generator=gen)
    assert torch.equal(gather_rows(x, rows)[0, 0], x[0, 5])


# -- models: cheap forwards against full ones -----------------------------------------------

@pytest.mark.parametrize("name,model,ctx,grid", CASES, ids=[c[0] for c in CASES])
def test_cheap_forward_of_all_rows_is_the_exact_forward(name, model, ctx, grid):
    """Recomputing every row replaces every recorded K/V layer by layer: the exact forward."""
    B = 3 if name != "class" else 2
    kw = ctx(B)
    old, new = _tokens(model, B, grid, 0), _tokens(model, B, grid, 1)
    store = KVStore()
    with torch.no_grad():
        full_old = model(old, kv_store=store, **kw)
        torch.testing.assert_close(full_old, model(old, **kw), atol=0, rtol=0)  # recording changes nothing
        N = grid[0] * grid[1]
        rows = torch.arange(N).flip(0)[None].expand(B, -1).contiguous()  # any order
        cheap = model(new, kv_store=store, rows=rows, **kw)
        exact = _flat(model(new, **kw))
    torch.testing.assert_close(cheap, exact[:, rows[0]], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name,model,ctx,grid", CASES, ids=[c[0] for c in CASES])
def test_cheap_forward_of_unchanged_tokens_reproduces_the_recorded_logits(name, model, ctx, grid):
    """Rows recomputed with unchanged inputs see the same K/V: their logits are the full ones;
    rows of other images (padding included) never disturb them."""
    B = 2
    kw = ctx(B)
    tokens = _tokens(model, B, grid, 2)
    store = KVStore()
    with torch.no_grad():
        full = _flat(model(tokens, kv_store=store, **kw))
        sel = torch.zeros(B, grid[0] * grid[1], dtype=torch.bool)
        sel[0, [1, 6, 7, 12]] = True
        sel[1, [3]] = True
        rows = rows_from_mask(sel)
        cheap = model(tokens, kv_store=store, rows=rows, **kw)
    torch.testing.assert_close(cheap, full.gather(1, rows[..., None].expand(-1, -1, full.shape[-1])),
                               atol=2e-5, rtol=2e-5)


# -- sampler --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("tiny", seed=3)


def _embeds(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, TEXT, generator=gen), torch.randn(n, 6, TEXT, generator=gen)


RUN = dict(num_steps=8, guidance_scale=3.0, output_type="tokens", progress=False)


def _today(pipe, embeds, neg, seed, num_steps, guidance_scale, mask_schedule="cosine"):
    """The exact sampler as it ran before the cache: a plain function doing both branches."""
    m = pipe.transformer
    ctx = musefast.models.transformer.Context.cat([m.prepare_context(embeds), m.prepare_context(neg)])

    def forward(tokens):
        return m(torch.cat([tokens, tokens]), context=ctx).chunk(2)

    s = pipe.settings
    sampler = MaskGitSampler(s.preset, progress=False, num_steps=num_steps, guidance_scale=guidance_scale,
                             temperature=s.temperature, choice_temperature=s.choice_temperature,
                             mask_schedule=mask_schedule)
    B, N = embeds.shape[0], m.config.seq_len
    tokens = torch.full((B, N), m.mask_token_id)
    return sampler(forward, tokens, mask_token_id=m.mask_token_id, seed=seed).view(B, 4, 4)


def test_cache_off_and_refresh_1_give_the_exact_tokens(pipe):
    emb, neg = _embeds(4)
    today = _today(pipe, emb, neg, 7, 8, 3.0)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg, seed=7, **RUN)
    assert torch.equal(pipe(**kw), today)
    assert torch.equal(pipe(**kw, cache=StepCache(refresh=1)), today)
    assert torch.equal(pipe(**kw, cache=StepCache(refresh=1, recompute="masked")), today)
    cached = pipe(**kw, cache=StepCache(refresh=4, recompute="lowest_confidence", fraction=0.25))
    assert not torch.equal(cached, today)  # the cheap steps do change something: the test can fail


def test_refresh_1_is_exact_for_uvit_and_class_conditional_models():
    for model, ctx, grid in [(c[1], c[2], c[3]) for c in CASES if c[0] in ("uvit_down", "class")]:
        B = 2
        kw = ctx(2 * B)
        first = {k: (v[:B] if isinstance(v, torch.Tensor) else musefast.sampling.cache.batch_slice(v, slice(0, B)))
                 for k, v in kw.items()}
        if "context" in kw:
            fwd = GuidedForward(model, first["context"], kw["context"])
        else:  # class-conditional: a GuidedForward-like wrapper passing labels
            fwd = GuidedForward(lambda t, context, **c: model(t, class_labels=context, **c),
                                first["class_labels"], kw["class_labels"])
        tokens = torch.full((B, *grid), model.mask_token_id)
        outs = [MaskGitSampler("maskgit", num_steps=6, guidance_scale=2.0, progress=False, cache=c)(
            fwd, tokens, mask_token_id=model.mask_token_id, seed=1) for c in (None, StepCache(refresh=1), "fast")]
        assert torch.equal(outs[0], outs[1])
        assert outs[2].shape == outs[0].shape and int(outs[2].max()) < model.mask_token_id


@pytest.mark.parametrize("cache", [StepCache(refresh=3, recompute="masked"), "fast"])
def test_no_kv_leak_between_images_or_calls(pipe, cache):
    emb, neg = _embeds(3)
    other, _ = _embeds(3, seed=9)
    kw = dict(negative_prompt_embeds=neg, seed=5, cache=cache, **RUN)
    a = pipe(prompt_embeds=emb, **kw)
    swapped = torch.cat([emb[:1], other[1:]])  # same first image, different neighbours
    b = pipe(prompt_embeds=swapped, **kw)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1:], b[1:])
    assert torch.equal(pipe(prompt_embeds=emb, **kw), a)  # a later call starts from nothing


def test_memory_is_one_copy_of_the_per_layer_kv(pipe):
    emb, neg = _embeds(2)
    cfg = pipe.transformer.config
    B, L, layers = 2 * emb.shape[0], cfg.seq_len, cfg.depth  # both CFG branches
    one_copy = layers * 2 * B * L * cfg.dim * 4  # K and V, float32
    for cache, extra in [(StepCache(refresh=3, recompute="masked"), 0),
                         (StepCache(refresh=3, recompute="lowest_confidence"), B * L * cfg.codebook_size * 4)]:
        sampler = pipe._sampler(pipe._settings(dict(num_steps=8, guidance_scale=3.0)), 8, None, False, cache=cache)
        fwd = pipe._guided_forward(pipe.transformer, pipe.transformer.prepare_context, (emb, None), (neg, None), True)
        sampler(fwd, torch.full((2, L), cfg.mask_token_id), mask_token_id=cfg.mask_token_id, seed=0)
        run = sampler.last_cache_run
        assert run.full_steps == 3 and run.cheap_steps == 5
        assert run.store.nbytes("k") + run.store.nbytes("v") == one_copy
        # extra: the cached logits (lowest_confidence) and one float per position (confidence)
        assert run.peak_bytes <= one_copy + extra + (B // 2) * L * 4


def test_inpaint_keeps_tokens_outside_the_mask_with_the_cache(pipe):
    img = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 32, 32)
    mask[:, :, :16] = 1
    emb, neg = _embeds(2)
    known = pipe.encode(img)
    for cache in ("fast", StepCache(refresh=2, recompute="masked")):
        out = pipe.inpaint(img, mask, prompt_embeds=emb, negative_prompt_embeds=neg, seed=0, num_steps=6,
                           output_type="tokens", progress=False, cache=cache)
        assert torch.equal(out[:, :, 2:], known[:, :, 2:])


def test_uvit_inpaint_through_the_sampler_keeps_known_tokens():
    model, ctx, grid = next((c[1], c[2], c[3]) for c in CASES if c[0] == "uvit")
    kw = ctx(2)
    known = torch.randint(0, 32, (2, *grid))
    masked = torch.zeros(2, *grid, dtype=torch.bool)
    masked[0, :2] = True
    masked[1, :, 1:] = True
    out = MaskGitSampler("amused", num_steps=6, progress=False, guidance_scale=1.0, cache="fast")(
        GuidedForward(model, kw["context"]), known.masked_fill(masked, model.mask_token_id), masked,
        mask_token_id=model.mask_token_id, seed=0)
    assert torch.equal(out[~masked], known[~masked])


# -- guidance options -----------------------------------------------------------------------

def test_guidance_interval_and_cosine_decay_values():
    T = 10
    g = [guidance_scale_at("constant", 4.0, i, T, (0.0, 0.5)) for i in range(T)]
    assert g == [4.0] * 5 + [1.0] * 5
    d = [guidance_scale_at("cosine_decay", 4.0, i, T) for i in range(T)]
    assert d[0] == 4.0 and math.isclose(d[-1], 1.0) and all(a > b for a, b in zip(d, d[1:]))
    for bad in [(0.6, 0.2), (0, 2), "ab", 3]:
        with pytest.raises(ValueError, match="guidance_interval"):
            MaskGitSampler("maskgit", guidance_interval=bad)


def test_steps_without_guidance_halve_the_batch(pipe):
    batches = []
    model = pipe.transformer
    hook = model.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        emb, neg = _embeds(2)
        pipe(prompt_embeds=emb, negative_prompt_embeds=neg, seed=0, guidance_interval=(0.0, 0.5), **RUN)
    finally:
        hook.remove()
    assert batches == [4] * 4 + [2] * 4


def test_the_fast_preset_brings_its_guidance_interval_unless_one_is_given():
    assert MaskGitSampler("maskgit", cache="fast").preset.guidance_interval == (0.0, 0.5)
    assert MaskGitSampler("maskgit", cache="fast", guidance_interval=(0, 1)).preset.guidance_interval == (0, 1)
    assert MaskGitSampler("maskgit", cache=StepCache()).preset.guidance_interval is None


def test_cache_settings_are_checked():
    assert resolve_cache("fast") is musefast.sampling.cache.FAST and resolve_cache(None) is None
    for bad, match in [(dict(refresh=0), "refresh"), (dict(recompute="all"), "recompute"),
                       (dict(fraction=0.0), "fraction"), (dict(guidance_interval=(1, 0)), "guidance_interval")]:
        with pytest.raises(ValueError, match=match):
            StepCache(**bad)
    with pytest.raises(ValueError, match="cache must be"):
        MaskGitSampler("maskgit", cache="slow")
    with pytest.raises(ValueError, match="GuidedForward"):
        MaskGitSampler("maskgit", cache="fast", progress=False)(lambda t: torch.zeros(*t.shape, 5),
                                                                 torch.full((1, 4), 5), mask_token_id=5)


def test_cli_generate_takes_cache_fast():
    from musefast.cli import _common_kwargs, build_parser

    args = build_parser().parse_args(["generate", "a red circle", "--cache", "fast"])
    assert _common_kwargs(args)["cache"] == "fast"
    assert "cache" not in _common_kwargs(build_parser().parse_args(["generate", "a red circle"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "a red circle", "--cache", "slow"])


def test_amused_pipeline_cache_and_guidance_interval(tmp_path):
    pytest.importorskip("diffusers")
    from amused_tiny import make_tiny_amused
    from musefast.pipelines.amused import AmusedPipeline

    make_tiny_amused(tmp_path, "512")
    pipe = AmusedPipeline.from_pretrained(tmp_path)
    kw = dict(prompt=["a cat", "a dog"], seed=3, num_inference_steps=6, output_type="tokens", progress=False)
    exact = pipe(**kw)
    assert torch.equal(pipe(**kw, cache=StepCache(refresh=1)), exact)
    assert pipe(**kw, cache="fast", guidance_interval=(0.0, 0.5)).shape == exact.shape
    image = pipe.decode(exact)
    mask = torch.zeros(2, *image.shape[-2:])
    mask[:, :, : image.shape[-1] // 2] = 1
    out = pipe.inpaint(image, mask, ["a cat", "a dog"], seed=0, num_inference_steps=6, output_type="tokens",
                       progress=False, cache="fast")
    half = out.shape[-1] // 2
    assert torch.equal(out[..., half:], pipe.encode(image)[..., half:])
    with pytest.raises(ValueError, match="fused"):
        pipe(**kw, sampler="compat", cache="fast")
