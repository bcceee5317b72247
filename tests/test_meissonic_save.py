"""MeissonicPipeline.save_pretrained writes the peer's layout: the same files, keys and tensors
as the peer's own folder it was loaded from."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import musefast

FIXTURE = Path(__file__).parent / "fixtures" / "meissonic" / "meissonic"


def test_save_pretrained_writes_back_the_peer_folder(tmp_path):
    pipe = musefast.load(FIXTURE, dtype=None)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text()) == json.loads(
        (FIXTURE / "model_index.json").read_text())
    for name in ("transformer", "vqvae"):
        ours = load_file(str(tmp_path / name / "diffusion_pytorch_model.safetensors"))
        theirs = load_file(str(FIXTURE / name / "diffusion_pytorch_model.safetensors"))
        assert ours.keys() == theirs.keys(), name
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), key
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config == json.loads((FIXTURE / "transformer" / "config.json").read_text())
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == json.loads((FIXTURE / "scheduler" / "scheduler_config.json").read_text())


def test_saved_folder_loads_with_a_variant(tmp_path):
    pipe = musefast.load(FIXTURE, dtype=None)
    pipe.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = musefast.MeissonicPipeline.from_pretrained(tmp_path, variant="fp16", dtype=None)
    kw = dict(height=64, width=64, num_inference_steps=2, seed=1, output_type="tokens", progress=False)
    assert torch.equal(loaded("a cat", **kw), pipe("a cat", **kw))
