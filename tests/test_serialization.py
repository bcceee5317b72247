"""The component format: config.json + model.safetensors for any module with a dataclass config."""
import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from torch import nn

from musefast.models.serialization import (
    COMPONENTS,
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_component,
    load_weights_strict,
    register_component,
    save_component,
)


@dataclass(frozen=True)
class TiedConfig:
    vocab: int = 11
    width: int = 6
    sizes: tuple[int, ...] = (6, 5)


class Tied(nn.Module):
    """An embedding tied to the output head, plus a slice-shaped buffer sharing memory."""

    config_class = TiedConfig

    def __init__(self, config: TiedConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.width)
        self.body = nn.Linear(*config.sizes)
        self.head = nn.Linear(config.width, config.vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("body_rows", self.body.weight.data[:2])  # overlaps body.weight


def test_round_trip_with_tied_and_overlapping_tensors(tmp_path):
    model = Tied(TiedConfig())
    folder = save_component(model, tmp_path / "c")
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        stored = set(f.keys())
    assert "embed.weight" in stored and "head.weight" not in stored  # tied: stored once
    loaded = load_component(folder, Tied)
    assert loaded.head.weight is loaded.embed.weight
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert loaded.config == TiedConfig() and isinstance(loaded.config.sizes, tuple)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["_class"] == "Tied" and config["sizes"] == [6, 5]


def test_registry_and_errors(tmp_path):
    folder = save_component(Tied(TiedConfig(vocab=5)), tmp_path / "c")
    with pytest.raises(ValueError, match="unknown component class 'Tied'"):
        load_component(folder, {})
    try:
        register_component(Tied)
        assert load_component(folder).config.vocab == 5  # default registry
    finally:
        COMPONENTS.pop("Tied", None)
    with pytest.raises(TypeError, match="config_class"):
        register_component(nn.Linear)
    with pytest.raises(TypeError, match="dataclass instance"):
        save_component(nn.Linear(2, 2), tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_component(tmp_path / "missing", Tied)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_component(folder, Tied)


def test_mismatches_are_reported(tmp_path):
    folder = save_component(Tied(TiedConfig()), tmp_path / "c")
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "sizes": [6, 4]}))
    with pytest.raises(ValueError) as err:
        load_component(folder, Tied)
    assert "shape mismatch" in str(err.value) and "body.weight" in str(err.value)
    assert str(folder / WEIGHTS_NAME) in str(err.value)
    model = Tied(TiedConfig())
    state = {**model.state_dict(), "extra.weight": torch.zeros(1)}
    del state["body.bias"]
    with pytest.raises(ValueError, match=r"(?s)in f\.safetensors.*missing \(1\): body\.bias.*unexpected \(1\): extra\.weight"):
        load_weights_strict(model, state, source="f.safetensors")


def test_no_pickle_files_written(tmp_path):
    folder = save_component(Tied(TiedConfig()), tmp_path / "c")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_loading_in_pieces_matches_one_piece(tmp_path):
    """load_component reads a file a piece at a time (bounded peak memory); one tensor per piece
    gives the same module, tied weights and overlapping buffers included."""
    from musefast.models.serialization import load_file_in_pieces

    torch.manual_seed(3)
    model = Tied(TiedConfig())
    folder = save_component(model, tmp_path / "c")
    torch.manual_seed(4)
    fresh = Tied(TiedConfig())
    load_file_in_pieces(fresh, folder / WEIGHTS_NAME, piece_bytes=1)
    assert fresh.head.weight is fresh.embed.weight
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="shape mismatch"):
        load_file_in_pieces(Tied(TiedConfig(sizes=(6, 4))), folder / WEIGHTS_NAME, piece_bytes=1)
