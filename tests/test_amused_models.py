"""aMUSEd components against diffusers (a test extra): UVit2D logits, the VQ, loading, errors.

Tiny random diffusers models are built offline, saved with ``save_pretrained`` and loaded by
musefast from the folder. Logits follow the project's error rule: musefast's error against a float64
run of diffusers' model is at most 2x (+ eps) diffusers' own error in the same dtype.
"""
import json
import shutil

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import musefast  # noqa: E402
from amused_tiny import CODEBOOK, MASK_ID, POOLED, TEXT_WIDTH, VOCAB, make_tiny_amused, make_uvit, make_vqmodel  # noqa: E402
from musefast.models import UVit2D  # noqa: E402
from musefast.models.vqmodel import load_vqmodel  # noqa: E402
from musefast.pipelines.amused import AmusedPipeline  # noqa: E402


def _inputs(batch, grid, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, grid, grid), generator=g)
    ids[0, 0, :2] = MASK_ID
    return dict(
        input_ids=ids,
        encoder_hidden_states=torch.randn(batch, 16, TEXT_WIDTH, generator=g),
        pooled_text_emb=torch.randn(batch, POOLED, generator=g),
        micro_conds=torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]]).expand(batch, 5),
    )


def _theirs(model, inputs, dtype):
    m = model.to(dtype)
    args = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        out = m(**args).permute(0, 2, 3, 1).double()  # (B, K, h, w) -> (B, h, w, K)
    model.float()
    return out


@pytest.mark.parametrize("style,grid", [("256", 4), ("512", 8)])
def test_uvit_logits_match_diffusers(tmp_path, style, grid):
    model = make_uvit(style)
    model.save_pretrained(tmp_path)
    ours = UVit2D.from_pretrained(tmp_path)
    assert ours.config.downsample == (style == "512") and ours.config.use_bias == (style == "512")
    inputs = _inputs(3, grid)
    exact = _theirs(model, inputs, torch.float64)
    for dtype, eps in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)):
        ours.to(dtype)
        with torch.no_grad():
            got = ours(inputs["input_ids"], inputs["encoder_hidden_states"], inputs["pooled_text_emb"],
                       inputs["micro_conds"])
            context = ours.prepare_context(inputs["encoder_hidden_states"], inputs["pooled_text_emb"],
                                           inputs["micro_conds"][0])
            again = ours(inputs["input_ids"], context=context)
        assert got.shape == (3, grid, grid, CODEBOOK) and got.dtype == dtype
        assert torch.equal(got, again)  # a prepared context is the same computation
        ours_err = (got.double() - exact).abs().max().item()
        their_err = (_theirs(model, inputs, dtype) - exact).abs().max().item()
        assert ours_err <= 2 * their_err + eps, (dtype, ours_err, their_err)


def test_vq_indices_and_pixels_match_diffusers(tmp_path):
    vq = make_vqmodel()
    vq.save_pretrained(tmp_path)
    ours = load_vqmodel(tmp_path)
    assert ours.downsampling_factor == 4 and ours.config.codebook_size == CODEBOOK
    images = torch.rand(3, 3, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = vq.encode(images).latents
        theirs = vq.quantize(latents)[2][2].view(3, 4, 8)
        got = ours.encode(images)
        # ties are legal: compare the distance at the chosen code with the minimum
        z = latents.permute(0, 2, 3, 1)
        d = torch.cdist(z.reshape(-1, z.shape[-1]), vq.quantize.embedding.weight)
        chosen = d.gather(1, got.reshape(-1, 1))[:, 0]
        assert torch.allclose(chosen, d.min(1).values, atol=1e-5)
        assert (got == theirs).float().mean() > 0.95
        decoded = vq.decode(theirs.reshape(-1), force_not_quantize=True, shape=(3, 4, 8, 4)).sample.clip(0, 1)
        assert torch.allclose(ours.decode(theirs), decoded, atol=1e-5)


def test_vq_half_decodes_in_float32(tmp_path):
    vq = make_vqmodel()
    vq.save_pretrained(tmp_path, variant="fp16")
    ours = load_vqmodel(tmp_path)
    assert ours.dtype == torch.float32  # force_upcast: the aMUSEd VQ always runs in float32
    tokens = torch.randint(0, CODEBOOK, (1, 4, 4))
    expected = vq.decode(tokens.reshape(-1), force_not_quantize=True, shape=(1, 4, 4, 4)).sample.clip(0, 1)
    assert torch.allclose(ours.decode(tokens), expected, atol=1e-2)  # fp16-rounded weights


def test_fp16_variant_loads(tmp_path):
    model = make_uvit("256")
    model.half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ours = UVit2D.from_pretrained(tmp_path)  # the only variant present
    assert ours.dtype == torch.float16
    ours32 = UVit2D.from_pretrained(tmp_path, variant="fp16", dtype=torch.float32)
    reference = model.float()
    inputs = _inputs(2, 4)
    with torch.no_grad():
        got = ours32(inputs["input_ids"], inputs["encoder_hidden_states"], inputs["pooled_text_emb"],
                     inputs["micro_conds"])
        expected = reference(**inputs).permute(0, 2, 3, 1)
    assert torch.allclose(got, expected, atol=1e-4)
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.bf16.safetensors"):
        UVit2D.from_pretrained(tmp_path, variant="bf16")


def test_musefast_component_round_trip(tmp_path):
    from musefast.models import save_component

    model = make_uvit("512")
    model.save_pretrained(tmp_path / "diffusers")
    ours = UVit2D.from_pretrained(tmp_path / "diffusers")
    save_component(ours, tmp_path / "musefast")
    again = UVit2D.from_pretrained(tmp_path / "musefast")
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


# -- clear errors that name what is wrong ---------------------------------------------------------------


def _edit_weights(folder, fn):
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))
    return path


def test_mismatched_weights_name_file_and_keys(tmp_path):
    make_uvit("256").save_pretrained(tmp_path)
    path = _edit_weights(tmp_path, lambda s: (s.pop("transformer_layers.1.attn1.to_k.weight"),
                                              s.__setitem__("extra.weight", torch.zeros(2)),
                                              s.__setitem__("mlm_layer.conv2.weight", torch.zeros(5, 16, 1, 1))))
    with pytest.raises(ValueError) as err:
        UVit2D.from_pretrained(tmp_path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing (1): transformer_layers.1.attn1.to_k.weight" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "mlm_layer.conv2.weight (5, 16, 1, 1)" in msg


def test_config_that_does_not_fit_the_weights(tmp_path):
    make_uvit("256").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing \(\d+\): transformer_layers\.2\."):
        UVit2D.from_pretrained(tmp_path)
    cfg["brand_new_option"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="brand_new_option"):
        UVit2D.from_pretrained(tmp_path)


def test_missing_or_foreign_files(tmp_path):
    make_uvit("256").save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights diffusion_pytorch_model.safetensors"):
        UVit2D.from_pretrained(tmp_path / "t")
    vq_dir = tmp_path / "vq"
    make_vqmodel().save_pretrained(vq_dir)
    with pytest.raises(ValueError, match="expected a diffusers UVit2DModel config, got _class_name='VQModel'"):
        UVit2D.from_diffusers(vq_dir)
    (vq_dir / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read weights file .*vq/diffusion_pytorch_model.safetensors"):
        load_vqmodel(vq_dir)
    with pytest.raises(FileNotFoundError, match="model folder not found: .*nothing"):
        load_vqmodel(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty/config.json not found"):
        load_vqmodel(tmp_path / "empty")


def test_unsupported_vq_configs_are_refused(tmp_path):
    from diffusers import VQModel

    VQModel(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mid_block_add_attention=True is not supported"):
        load_vqmodel(tmp_path)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("amused256")
    make_tiny_amused(folder, "256")
    return folder


def test_pipeline_folder_errors_name_the_part(tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "vqvae")
    with pytest.raises(FileNotFoundError, match="no vqvae/ sub-folder"):
        AmusedPipeline.from_pretrained(broken)
    (broken / "model_index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        AmusedPipeline.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        AmusedPipeline.from_pretrained(tmp_path / "does" / "not" / "exist")


def test_musefast_load_recognises_an_amused_folder(tiny_folder):
    pipe = musefast.load(tiny_folder)
    assert isinstance(pipe, AmusedPipeline)
    assert pipe.mask_token_id == MASK_ID and pipe.image_size == 16 and pipe.masking_schedule == "cosine"
    images = pipe("a photo of a cat", num_inference_steps=2, seed=0, progress=False)
    assert len(images) == 1 and images[0].size == (16, 16) and images.images is images
    out = musefast.generate("a red house", model=pipe, num_steps=2, seed=0, output_type="np", progress=False)
    assert out.shape == (1, 16, 16, 3)


def test_pipeline_fp16_variant_folder(tmp_path):
    pipe = make_tiny_amused(tmp_path / "src", "256")
    pipe.transformer.half().save_pretrained(tmp_path / "src" / "transformer", variant="fp16")
    pipe.vqvae.half().save_pretrained(tmp_path / "src" / "vqvae", variant="fp16")
    for sub in ("transformer", "vqvae"):
        (tmp_path / "src" / sub / "diffusion_pytorch_model.safetensors").unlink()
    ours = AmusedPipeline.from_pretrained(tmp_path / "src", variant="fp16")
    assert ours.transformer.dtype == torch.float16 and ours.vqvae.dtype == torch.float32
    tokens = ours("a cat", num_inference_steps=2, seed=1, output_type="latent", progress=False)
    assert tokens.shape == (1, 4, 4) and int(tokens.max()) < CODEBOOK
