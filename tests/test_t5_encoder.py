"""The plain-PyTorch T5 encoder against its reference twin, transformers' T5EncoderModel (so
the demo loads without importing transformers)."""
import subprocess
import sys
import warnings

import pytest
import torch

from musefast.models.t5_encoder import JSONTokenizer, load_plain_t5
from musefast.models.text import T5TextEncoder, load_text_encoder
from musefast.pipelines.demo import DEMO_FOLDER
from tiny_text import make_tiny_t5

PROMPTS = ["a red circle on the left", "", "an orange ring above a cyan cross", "zzz qq " * 12]


@pytest.fixture(scope="module", params=["demo", "tiny"])
def folder(request, tmp_path_factory):
    if request.param == "demo":
        return DEMO_FOLDER / "text_encoder"
    return make_tiny_t5(tmp_path_factory.mktemp("t5"), num_layers=3)


def test_same_tokens_and_hidden_states_as_transformers(folder):
    plain = load_text_encoder(folder)
    reference = T5TextEncoder.from_pretrained(folder)  # transformers' model and tokenizer
    assert not hasattr(plain.model, "generate") and isinstance(plain.tokenizer, JSONTokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the demo's unknown-word warning: tested in test_prompts.py
        ids, mask = plain.tokenize(PROMPTS)
        a = plain.encode(PROMPTS)
        ref_ids, ref_mask = reference.tokenize(PROMPTS)
        b = reference.encode(PROMPTS)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.mask, b.mask)


def test_save_and_reload_round_trip(folder, tmp_path):
    plain = load_text_encoder(folder)
    plain.save_pretrained(tmp_path / "copy")
    again = load_text_encoder(tmp_path / "copy")
    assert torch.equal(plain.encode(PROMPTS[:3]).hidden, again.encode(PROMPTS[:3]).hidden)
    assert load_plain_t5(tmp_path / "copy") is not None


def test_loading_the_demo_does_not_import_transformers():
    code = ("import sys, musefast; pipe = musefast.load('demo'); pipe('a red circle on the left', num_steps=2, "
            "progress=False); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr

