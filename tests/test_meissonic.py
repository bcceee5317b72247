"""Meissonic / Monetico: parity with the peer's own code (viiika/Meissonic) from committed fixtures.

The peer runs only on diffusers 0.32.x, so its outputs were computed once in a separate
environment by ``tests/fixtures/meissonic/make_fixture.py`` (see the README there): tiny random
models saved by the peer's ``save_pretrained``, their fp32 logits on fixed inputs, and the tokens
of the peer pipeline for fixed generator seeds. Here: one call loads each folder; logits and
compat-sampler tokens must match.

Tolerance: fp32 logits within 1e-4 (same ops in the same dtype; measured difference 0).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import musefast
from musefast import ops
from musefast.compat import meissonic as compat
from musefast.models.meissonic import MeissonicConfig, MeissonicTransformer
from musefast.models.serialization import save_component
from musefast.nn.rope import RopeTables
from musefast.reference import rope as ref_rope

FIXTURES = Path(__file__).parent / "fixtures" / "meissonic"
PIPELINE = FIXTURES / "meissonic"
TRANSFORMERS = {"meissonic": (PIPELINE / "transformer", PIPELINE), "monetico": (FIXTURES / "monetico",) * 2}


def _forward(model, io, **kw):
    return model(io["tokens"], io["encoder_hidden_states"], io["pooled_text_emb"], io["micro_conds"],
                 io["timestep"], **kw)


@pytest.mark.parametrize("name", sorted(TRANSFORMERS))
def test_logits_match_the_peer(name):
    folder, io_folder = TRANSFORMERS[name]
    io = load_file(io_folder / "transformer_io.safetensors")
    model = MeissonicTransformer.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = _forward(model, io)
    assert logits.shape == io["logits"].shape  # (B, codebook, H, W), the peer's layout
    torch.testing.assert_close(logits, io["logits"], atol=1e-4, rtol=0)
    # the prepared context (what the pipeline passes at every step) gives the same logits
    context = model.prepare_context(io["encoder_hidden_states"], io["pooled_text_emb"], io["micro_conds"])
    with torch.no_grad():
        torch.testing.assert_close(model(io["tokens"], timestep=io["timestep"], context=context), logits)
        # the timestep matters: a wrong step value would go unnoticed otherwise
        assert not torch.allclose(model(io["tokens"], timestep=io["timestep"] + 1, context=context), logits)


def test_fp16_variant_loads_in_the_file_dtype():
    model = MeissonicTransformer.from_pretrained(FIXTURES / "monetico")  # only the .fp16 file is there
    assert model.dtype == torch.float16 and not model.config.downsample
    with pytest.raises(FileNotFoundError, match="fp32"):
        MeissonicTransformer.from_pretrained(FIXTURES / "monetico", variant="fp32")


def test_bf16_logits_within_the_flash_attention_rule():
    """bf16 error vs the fp32 peer logits is at most 2x that of torch's own bf16 computation of the
    same model (the project's error rule), here measured with musefast's reference ops (attention, qk_norm_rope)."""
    folder, io_folder = TRANSFORMERS["meissonic"]
    io = load_file(io_folder / "transformer_io.safetensors")
    model = MeissonicTransformer.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = _forward(model, io).float()
        with ops.use_backend("reference"):
            slow = _forward(model, io).float()
    err_fast = (fast - io["logits"]).abs().max().item()
    err_ref = (slow - io["logits"]).abs().max().item()
    assert err_fast <= 2 * err_ref + 1e-3, (err_fast, err_ref)


def test_real_architecture_size():
    """MeissonFlow/Meissonic's defaults: ~1.0 B parameters, <= 2.2 GB in bf16 (built on the meta
    device: no memory, no init)."""
    with torch.device("meta"):
        model = MeissonicTransformer(MeissonicConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 0.95e9 < n < 1.1e9, n
    assert n * 2 <= 2.2e9
    assert model.config.inner_dim == 1024 and len(model.single_transformer_blocks) == 28


def test_musefast_component_round_trip(tmp_path):
    model = MeissonicTransformer.from_pretrained(PIPELINE / "transformer")
    save_component(model, tmp_path / "t")
    again = MeissonicTransformer.from_pretrained(tmp_path / "t")
    io = load_file(PIPELINE / "transformer_io.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(_forward(again, io), _forward(model, io), atol=0, rtol=0)


def test_recognised_by_config_keys_not_class_name(tmp_path):
    assert compat.is_meissonic_transformer(PIPELINE / "transformer")
    assert compat.is_meissonic_pipeline(PIPELINE)
    data = json.loads((PIPELINE / "transformer" / "config.json").read_text())
    assert data["_class_name"] == "Transformer2DModel"
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "config.json").write_text(json.dumps(dict(data, _class_name="Anything")))
    assert compat.is_meissonic_transformer(tmp_path / "renamed")
    (tmp_path / "other").mkdir()  # diffusers' own Transformer2DModel / Flux configs lack the codebook keys
    (tmp_path / "other" / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "codebook_size"}))
    assert not compat.is_meissonic_transformer(tmp_path / "other")


def test_conversion_is_strict(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "transformer"
    shutil.copytree(PIPELINE / "transformer", folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    state.pop("single_transformer_blocks.1.proj_mlp.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match=r"(?s)missing.*proj_mlp.weight.*unexpected.*extra.weight"):
        MeissonicTransformer.from_pretrained(folder)


@pytest.mark.parametrize("bad, match", [
    (dict(pooled_projection_dim=8), "pooled_projection_dim"),
    (dict(axes_dims_rope=(2, 2, 2)), "axes_dims_rope"),
    (dict(axes_dims_rope=(3, 1, 4)), "axes_dims_rope"),
    (dict(upsample=False), "upsample"),
    (dict(guidance_embeds=True), "guidance_embeds"),
])
def test_config_errors(bad, match):
    base = dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                pooled_projection_dim=16, axes_dims_rope=(2, 2, 4), vocab_size=40, codebook_size=32)
    with pytest.raises(ValueError, match=match):
        MeissonicConfig(**{**base, **bad})


def test_input_errors():
    model = MeissonicTransformer.from_pretrained(PIPELINE / "transformer")
    io = load_file(PIPELINE / "transformer_io.safetensors")
    with pytest.raises(TypeError, match="int64"):
        _forward(model, dict(io, tokens=io["tokens"].int()))
    with pytest.raises(ValueError, match="even"):
        _forward(model, dict(io, tokens=io["tokens"][:, :3]))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        _forward(model, dict(io, encoder_hidden_states=io["encoder_hidden_states"][..., :5]))
    with pytest.raises(ValueError, match="micro_conds"):
        _forward(model, dict(io, micro_conds=io["micro_conds"][:, :4]))
    with pytest.raises(ValueError, match="timestep"):
        model(io["tokens"], io["encoder_hidden_states"], io["pooled_text_emb"], io["micro_conds"])


# -- RoPE: the half-table fast path against the reference definition ------------------------------


@pytest.mark.parametrize("axes", [(2, 2, 4), (16, 56, 56), (4, 6, 6)])
def test_rope_tables_match_reference(axes):
    """The half-width tables hold each angle of the reference's full-width tables once; text rows
    (zero ids) have angle 0, so ops.qk_norm_rope leaves them unrotated, exactly (tests/test_rope.py);
    rotation preserves each pair's norm and is not the identity on image rows."""
    D, h, w, text = sum(axes), 5, 3, 4
    ids = torch.zeros(text + h * w, 3)
    ids[text:, 1] = torch.arange(h).repeat_interleave(w).float()
    ids[text:, 2] = torch.arange(w).repeat(h).float()
    cos, sin = ref_rope.rope_tables(ids, axes)
    tables = RopeTables(ids, axes)
    assert torch.equal(tables.cos, cos[:, ::2]) and torch.equal(tables.sin, sin[:, 1::2])
    assert torch.equal(tables.cos[:text], torch.ones(text, D // 2)) and torch.equal(tables.sin[:text], torch.zeros(text, D // 2))
    x = torch.randn(2, 3, ids.shape[0], D)
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(ref_rope.apply_rope(x, cos, sin)), pair_norm(x))
    assert not torch.allclose(ref_rope.apply_rope(x, cos, sin)[:, :, text + 1:], x[:, :, text + 1:])


def test_rope_errors():
    with pytest.raises(ValueError, match="even"):
        ref_rope.rope_angles(torch.zeros(4, 3), (3, 1, 4))


# -- pipeline -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return musefast.load(PIPELINE)


def test_load_recognises_the_folder(pipe):
    assert isinstance(pipe, musefast.MeissonicPipeline)
    assert pipe.mask_token_id == 39 and pipe.vae_scale_factor == 32 and pipe.image_size == 1024
    assert pipe.text_encoder.max_length == 77


def test_compat_sampler_gives_the_peer_tokens(pipe):
    expected = load_file(PIPELINE / "pipeline_tokens.safetensors")
    cases = json.loads((PIPELINE / "pipeline_cases.json").read_text())
    assert set(cases) == set(expected)
    image, mask = _edit_inputs()
    for name, kw in cases.items():
        kw = dict(kw)
        generator = torch.Generator().manual_seed(kw.pop("seed"))
        if name in ("img2img", "inpaint"):  # the peer's Img2ImgPipeline / InpaintPipeline
            kw.update(image=image, **({"mask_image": mask} if name == "inpaint" else {}))
        tokens = pipe(generator=generator, output_type="tokens", sampler="compat", progress=False, **kw)
        assert torch.equal(tokens, expected[name]), name


def _edit_inputs():
    """make_fixture.py's 1024² image and mask: 32x32 seeded cells blown up to 32x32 pixels each."""
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(1, 3, 32, 32, generator=gen).repeat_interleave(32, 2).repeat_interleave(32, 3)
    mask = (torch.rand(1, 1, 32, 32, generator=gen) < 0.3).float().repeat_interleave(32, 2).repeat_interleave(32, 3)
    return image, mask


def test_fused_sampler_generates_and_decodes(pipe):
    out = pipe("a red cat", height=256, width=256, num_inference_steps=4, seed=3, output_type="tokens", progress=False)
    assert out.shape == (1, 8, 8) and bool((out < 32).all())
    again = pipe("a red cat", height=256, width=256, num_inference_steps=4, seed=3, output_type="tokens",
                 progress=False)
    assert torch.equal(out, again)
    images = pipe("a red cat", height=128, width=128, num_inference_steps=2, seed=3, output_type="np", progress=False)
    assert images.shape == (1, 128, 128, 3) and 0 <= images.min() and images.max() <= 1


def test_bf16_pipeline():
    pipe = musefast.MeissonicPipeline.from_pretrained(PIPELINE, dtype=torch.bfloat16, sampler="compat")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vqvae.dtype == torch.float32
    out = pipe("a red cat", height=256, width=256, num_inference_steps=3, seed=0, output_type="tokens", progress=False)
    assert out.shape == (1, 8, 8) and bool((out < 32).all())


def test_image_to_image_and_inpainting(pipe):
    image = torch.rand(1, 3, 256, 256)
    out = pipe("a dog", image=image, num_inference_steps=4, seed=1, output_type="tokens", progress=False)
    assert out.shape == (1, 8, 8)
    mask = torch.zeros(1, 256, 256)
    mask[:, :32, :32] = 1  # repaint the top-left token only
    known = pipe.encode(image)
    for sampler in ("fused", "compat"):
        out = pipe("a dog", image=image, mask_image=mask, num_inference_steps=4, seed=1, output_type="tokens",
                   sampler=sampler, progress=False)
        keep = torch.ones(8, 8, dtype=torch.bool)
        keep[0, 0] = False
        assert torch.equal(out[0][keep], known[0][keep])


def _int8_case():
    from musefast.cpu import int8

    reasons = int8.unavailable_reasons()
    return pytest.param(["--quantize", "int8"], id="int8", marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons)))


@pytest.mark.parametrize("extra", [[], ["--cache", "fast"], _int8_case()], ids=["exact", "step-cache", "int8"])
def test_cli_generates_from_a_meissonic_folder(tmp_path, extra):
    from musefast.cli import main

    out = tmp_path / "m.png"
    assert main(["generate", "a red cat", "--model", str(PIPELINE), "--steps", "4", "--seed", "1", "-q",
                 "-o", str(out), *extra]) == 0
    from PIL import Image

    assert Image.open(out).size == (1024, 1024)


def test_cli_from_png_reproduces_a_meissonic_image(tmp_path):
    """The PNG carries Meissonic's own defaults (guidance 9, not aMUSEd's 10) and the step cache,
    so --from-png makes the same image."""
    import numpy as np
    from PIL import Image

    from musefast.cli import main
    from musefast.image_metadata import read_params

    first, again = tmp_path / "m.png", tmp_path / "again.png"
    assert main(["generate", "a red cat", "--model", str(PIPELINE), "--steps", "4", "--seed", "3", "--cache", "fast",
                 "-q", "-o", str(first)]) == 0
    params = read_params(first)
    assert (params["steps"], params["guidance_scale"], params["cache"]) == (4, 9.0, "fast")
    assert params["sampler"].startswith("meissonic-")
    assert main(["generate", "--from-png", str(first), "-q", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))


def test_pipeline_errors(pipe):
    with pytest.raises(ValueError, match="output_type"):
        pipe("a", output_type="bogus")
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe("a", num_inference_steps=0)
    with pytest.raises(ValueError, match="disagree"):
        pipe("a", num_inference_steps=3, num_steps=4)
    with pytest.raises(ValueError, match="strength"):
        pipe("a", strength=0.3)
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        musefast.MeissonicPipeline.from_pretrained(PIPELINE / "transformer")


class _PeerTransformer(torch.nn.Module):
    """Stands in for the peer's Transformer2DModel (its source is not a package): the config and
    the state dict under the peer's keys are all that musefast reads of it."""

    def __init__(self, folder):
        super().__init__()
        self.config = json.loads((folder / "config.json").read_text())
        weights = load_file(folder / "diffusion_pytorch_model.safetensors")
        self._names = list(weights)
        for i, tensor in enumerate(weights.values()):
            self.register_parameter(f"p{i}", torch.nn.Parameter(tensor, requires_grad=False))

    def state_dict(self, *args, **kwargs):
        return dict(zip(self._names, self.parameters()))


def test_built_from_the_peers_objects_gives_the_loaded_pipelines_tokens(pipe):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")

    scheduler = type("Scheduler", (), {"config": json.loads((PIPELINE / "scheduler/scheduler_config.json").read_text())})()
    peer = musefast.MeissonicPipeline(
        vqvae=diffusers.VQModel.from_pretrained(PIPELINE / "vqvae"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(PIPELINE / "tokenizer"),
        text_encoder=transformers.CLIPTextModelWithProjection.from_pretrained(PIPELINE / "text_encoder"),
        transformer=_PeerTransformer(PIPELINE / "transformer"), scheduler=scheduler)
    assert peer.mask_token_id == pipe.mask_token_id and peer.text_encoder.max_length == 77
    kw = dict(seed=3, num_inference_steps=2, height=64, width=64, output_type="latent", progress=False,
              return_dict=False)
    assert torch.equal(peer("a cat", **kw)[0], pipe("a cat", **kw)[0])
    with pytest.raises(TypeError, match="peer's Transformer2DModel"):
        musefast.MeissonicPipeline(vqvae=peer.vqvae, transformer=torch.nn.Linear(2, 2))
