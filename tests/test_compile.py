"""torch.compile(fullgraph=True): the three ops, every model's forward and one decoding step of
each pipeline trace without a graph break and give the eager results.

The models and steps compile with the ``aot_eager`` backend: it runs dynamo's full capture (where
graph breaks and untraceable Python show up) and AOT autograd's fake-tensor tracing of our custom
ops, without inductor's C++ code generation, which would add minutes on a 2-core CPU. The ops
also compile with inductor, whose generated code trusts the custom ops' fake strides.
"""
import pytest
import torch

from musefast import ops
from musefast.models.transformer import MuseTransformer, MuseTransformerConfig, SuperResConfig, SuperResTransformer
from musefast.models.uvit import UVit2D, UVit2DConfig
from musefast.models.vqgan import VQGAN, VQGANConfig
from musefast.sampling import sampler as sampler_module


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, backend="aot_eager"):
    return torch.compile(fn, fullgraph=True, backend=backend)


def _ops_inputs():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(37, 12, generator=g), torch.randn(50, 12, generator=g)
    q = torch.randn(2, 2, 9, 16, generator=g)
    kv = torch.randn(2, 2, 5, 16, generator=g)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    logits = torch.randn(4, 9, 20, generator=g)
    tokens = torch.randint(0, 20, (2, 9), generator=g)
    masked = torch.rand(2, 9, generator=g) < 0.6
    return z, codebook, q, kv, mask, logits, tokens, masked


def _all_ops(z, codebook, q, kv, mask, logits, tokens, masked):
    idx, dist = ops.vq_nearest(z, codebook, return_distance=True)
    att = ops.attention(q, kv, kv, key_padding_mask=mask)
    cond, uncond = logits.chunk(2)
    new_tokens, new_masked = ops.cfg_sample_remask(
        cond, uncond, tokens=tokens, masked=masked, num_to_mask=torch.tensor([2, 1]), guidance_scale=3.0,
        choice_temperature=2.0, top_k=5, seed=2**64 - 3, step=4)
    return idx, dist, att, new_tokens, new_masked


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_ops_compile_fullgraph_and_match_eager(backend):
    inputs = _ops_inputs()
    eager = _all_ops(*inputs)
    compiled = _compiled(_all_ops, backend)(*inputs)
    for e, c in zip(eager, compiled):
        assert c.dtype == e.dtype and c.shape == e.shape
        if e.dtype.is_floating_point:
            torch.testing.assert_close(c, e, equal_nan=True)
        else:
            assert torch.equal(c, e)


def test_compiled_ops_keep_runtime_backend_choice(monkeypatch):
    """The backend is chosen when the compiled graph runs, as in eager: ``use_backend`` and
    ``backend=`` reach the dispatch; a backend that cannot run still raises."""
    calls = []
    real = ops.registry.op("vq_nearest").backends["reference"].fn
    monkeypatch.setattr(ops.registry.op("vq_nearest").backends["reference"], "fn",
                        lambda *a: calls.append("reference") or real(*a))
    z, codebook = torch.randn(7, 4), torch.randn(9, 4)
    fn = _compiled(lambda z, c: ops.vq_nearest(z, c))
    with ops.use_backend("reference"):
        fn(z, codebook)
    assert calls == ["reference"]
    forced = _compiled(lambda z, c: ops.vq_nearest(z, c, backend="cuda"))
    with pytest.raises(Exception, match="needs cuda tensors"):
        forced(z, codebook)


def _text(B=2, L=5, dim=16):
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    return torch.randn(B, L, dim), mask


def test_muse_transformer_forward_compiles():
    model = MuseTransformer(MuseTransformerConfig(codebook_size=64, grid_size=4, dim=32, depth=2, num_heads=2,
                                                  text_dim=16, mlp="geglu", qk_norm=True)).eval()
    tokens = torch.randint(0, 65, (2, 4, 4))
    hidden, mask = _text()
    with torch.no_grad():
        ctx = model.prepare_context(hidden, mask)
        eager = model(tokens, context=ctx)
        compiled = _compiled(lambda t, c: model(t, context=c))(tokens, ctx)
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(_compiled(model)(tokens, hidden, mask), model(tokens, hidden, mask))


def test_class_conditional_transformer_forward_compiles():
    model = MuseTransformer(MuseTransformerConfig(codebook_size=64, grid_size=4, dim=32, depth=2, num_heads=2,
                                                  text_dim=None, num_classes=10)).eval()
    tokens, labels = torch.randint(0, 65, (2, 4, 4)), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(_compiled(lambda t, c: model(t, class_labels=c))(tokens, labels),
                                   model(tokens, class_labels=labels))


def test_super_res_transformer_forward_compiles():
    high = MuseTransformerConfig(codebook_size=64, grid_size=8, dim=32, depth=2, num_heads=2, text_dim=16)
    model = SuperResTransformer(SuperResConfig(high=high, low_codebook_size=32, low_grid_size=4,
                                               encoder_depth=1)).eval()
    tokens, low = torch.randint(0, 65, (2, 8, 8)), torch.randint(0, 32, (2, 4, 4))
    hidden, mask = _text()
    with torch.no_grad():
        ctx = model.prepare_context(low, hidden, mask)
        torch.testing.assert_close(_compiled(lambda t, c: model(t, context=c))(tokens, ctx),
                                   model(tokens, context=ctx))


@pytest.mark.parametrize("downsample", [False, True])
def test_uvit_forward_compiles(downsample):
    cfg = UVit2DConfig(hidden_size=32, cond_embed_dim=24, micro_cond_encode_dim=8, micro_cond_embed_dim=40,
                       encoder_hidden_size=16, vocab_size=40, codebook_size=32, in_channels=16,
                       block_out_channels=24, num_res_blocks=1, block_num_heads=2, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, sample_size=4,
                       downsample=downsample, upsample=downsample)
    model = UVit2D(cfg).eval()
    tokens = torch.randint(0, 40, (2, 4, 4))
    hidden, _ = _text()
    pooled, micro = torch.randn(2, 24), torch.tensor([[256.0, 256, 0, 0, 6]] * 2)
    with torch.no_grad():
        ctx = model.prepare_context(hidden, pooled, micro)
        torch.testing.assert_close(_compiled(lambda t, c: model(t, context=c))(tokens, ctx),
                                   model(tokens, context=ctx))


def test_vqgan_encode_decode_compile():
    model = VQGAN(VQGANConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, num_mid_blocks=1, z_channels=8,
                              embed_dim=4, codebook_size=32, norm_groups=4)).eval()
    image = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.encode(image)
        assert torch.equal(_compiled(model.encode)(image), tokens)
        torch.testing.assert_close(_compiled(model.decode)(tokens), model.decode(tokens))



def test_meissonic_forward_compiles():
    """The fused q/k norm + RoPE (ops.qk_norm_rope) and the joint attention trace as custom ops."""
    from pathlib import Path

    from safetensors.torch import load_file

    from musefast.models.meissonic import MeissonicTransformer

    folder = Path(__file__).parent / "fixtures" / "meissonic" / "meissonic"
    model = MeissonicTransformer.from_pretrained(folder / "transformer", dtype=torch.float32)
    io = load_file(folder / "transformer_io.safetensors")
    with torch.no_grad():
        ctx = model.prepare_context(io["encoder_hidden_states"], io["pooled_text_emb"], io["micro_conds"])
        eager = model(io["tokens"], timestep=io["timestep"], context=ctx)
        compiled = _compiled(lambda t, s, c: model(t, timestep=s, context=c))(io["tokens"], io["timestep"], ctx)
    torch.testing.assert_close(compiled, eager)

def _check_one_step_compiles(monkeypatch, run_pipeline):
    """Run a real pipeline call; at its second decoding step, also run that step compiled with
    fullgraph=True on the same inputs and compare (the pipeline itself continues eagerly)."""
    original = sampler_module.MaskGitSampler.step
    seen = []

    def spy(self, model_fn, tokens, masked, **kw):
        eager = original(self, model_fn, tokens, masked, **kw)
        if kw["step"] == 1:
            step = _compiled(lambda t, m: original(self, model_fn, t, m, **kw))
            compiled = step(tokens, masked)
            seen.append((eager, compiled))
        return eager

    monkeypatch.setattr(sampler_module.MaskGitSampler, "step", spy)
    run_pipeline()
    assert len(seen) == 1, "the pipeline did not reach a second decoding step"
    (e_tokens, e_masked), (c_tokens, c_masked) = seen[0]
    assert torch.equal(c_tokens, e_tokens) and torch.equal(c_masked, e_masked)


def test_demo_pipeline_step_compiles(monkeypatch):
    import musefast

    pipe = musefast.load("demo")
    _check_one_step_compiles(monkeypatch, lambda: pipe("a red circle on the left", seed=3, progress=False,
                                                       guidance_scale=2.0))


def test_amused_pipeline_step_compiles(monkeypatch, tmp_path):
    pytest.importorskip("diffusers")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from amused_tiny import make_tiny_amused

    from musefast import AmusedPipeline

    make_tiny_amused(tmp_path / "amused", "512")
    pipe = AmusedPipeline.from_pretrained(tmp_path / "amused")
    _check_one_step_compiles(monkeypatch, lambda: pipe("a cat", num_inference_steps=3, seed=0, output_type="pt"))
