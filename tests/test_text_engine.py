"""The text encoders on the CPU engine's packed linears: every loader applies it on a CPU, and the
packed path gives the plain path's embeddings (fp32 within 1e-5 relative, the engine's rule).

transformers' CLIP and T5 hold plain ``nn.Linear``s with their activations (quick_gelu, gated
GELU/ReLU) as separate calls: the engine packs the linears only, so the activations stay exact."""
import pytest
import torch

from musefast.cpu import linear as cpu
from musefast.models import CLIPTextEncoder, T5TextEncoder, load_text_encoder
from musefast.pipelines.loading import runnable
from tiny_text import make_tiny_clip, make_tiny_t5

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

PROMPTS = ["a photo of a cat", "the red dog on the house!"]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"clip": make_tiny_clip(root / "clip", max_length=16), "t5": make_tiny_t5(root / "t5")}


LOADERS = {
    "clip": lambda f: CLIPTextEncoder.from_pretrained(f["clip"]),  # transformers, quick_gelu
    "t5_transformers": lambda f: T5TextEncoder.from_pretrained(f["t5"], max_length=12),
    "t5_plain": lambda f: load_text_encoder(f["t5"], max_length=12),  # musefast's own T5 twin
}
# what the readers return is plain; the loader (musefast.pipelines.loading) makes it run packed


@pytest.mark.parametrize("name", sorted(LOADERS))
@torch.no_grad()
def test_loaded_encoder_is_packed_and_equals_plain(folders, name):
    encoder = LOADERS[name](folders)
    assert not cpu.is_applied(encoder.model)
    assert runnable(encoder) is encoder and cpu.is_applied(encoder.model)
    with cpu.plain():
        want = encoder.encode(PROMPTS)
    got = encoder.encode(PROMPTS)
    assert _rel(got.hidden, want.hidden) < 1e-5
    if want.pooled is not None:
        assert _rel(got.pooled, want.pooled) < 1e-5
    packs = sum(m.__dict__[cpu.ENGINE_ATTR].packs for m in encoder.model.modules() if cpu.ENGINE_ATTR in m.__dict__)
    assert packs > 0  # the oneDNN path ran (packed at load), not the plain fallback everywhere
