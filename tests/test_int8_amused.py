"""quantize="int8" through AmusedPipeline.from_pretrained (a tiny diffusers aMUSEd folder): the
transformer runs in int8, the text encoder and VQ stay float."""
import pytest

from musefast.cpu import int8

pytestmark = pytest.mark.skipif(bool(int8.unavailable_reasons()), reason="; ".join(int8.unavailable_reasons()))


def test_amused_from_pretrained_quantize_int8(tmp_path):
    pytest.importorskip("diffusers")
    from amused_tiny import make_tiny_amused

    from musefast.pipelines.amused import AmusedPipeline

    make_tiny_amused(tmp_path / "amused", "256")
    pipe = AmusedPipeline.from_pretrained(tmp_path / "amused", quantize="int8")
    assert int8.is_applied(pipe.transformer) and not int8.is_applied(pipe.text_encoder.model)
    tokens = pipe("a cat", num_inference_steps=2, seed=0, output_type="tokens", progress=False)
    assert tokens.shape[-2:] == (4, 4)


def test_quantized_pipeline_keeps_the_float_dtype_and_compat_tokens(tmp_path):
    """dtype="auto" with int8 keeps the rest in the weights' dtype; a compat call runs on a float
    twin, so it gives exactly the tokens of the unquantized pipeline (diffusers' tokens)."""
    pytest.importorskip("diffusers")
    import torch
    from amused_tiny import make_tiny_amused

    from musefast.pipelines.amused import AmusedPipeline

    make_tiny_amused(tmp_path / "amused", "256")
    plain = AmusedPipeline.from_pretrained(tmp_path / "amused", dtype=None)
    quantized = AmusedPipeline.from_pretrained(tmp_path / "amused", quantize="int8")
    assert quantized.transformer.dtype == plain.transformer.dtype == torch.float32
    call = dict(num_inference_steps=4, output_type="tokens", progress=False, sampler="compat")
    want = plain("a cat", generator=torch.Generator().manual_seed(3), **call)
    got = quantized("a cat", generator=torch.Generator().manual_seed(3), **call)
    assert torch.equal(got, want)
    assert int8.is_applied(quantized.transformer)  # the pipeline itself stays quantized
