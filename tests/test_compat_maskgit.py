"""google-research/maskgit checkpoints -> musefast, against fixtures made with maskgit's own JAX code.

``tests/fixtures/maskgit/`` (see its README.md and make_fixtures.py): tiny seeded maskgit
``Transformer`` and ``VQVAE`` checkpoints in the released flax msgpack format, their outputs on
fixed inputs, the parameter names and shapes of the released ImageNet models, and msgpack
samples written by flax. JAX, flax and msgpack are not needed here.

Tolerance: fp32 against fp32 (flash-attn's rule: the error of a same-dtype recomputation, ~1e-6 here,
times 2 plus a small eps).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from musefast.compat import _msgpack
from musefast.compat import maskgit as mg
from musefast.compat._convert import ConversionError
from musefast.models.serialization import load_component, save_component
from musefast.models.transformer import MuseTransformer
from musefast.models.vqgan import VQGAN
from musefast.sampling import MaskGitSampler

FIXTURES = Path(__file__).parent / "fixtures" / "maskgit"
TRANSFORMER = FIXTURES / "maskgit_tiny_checkpoint"
TOKENIZER = FIXTURES / "tokenizer_tiny_checkpoint"
TINY = {"codebook_size": 16}  # the one number the weights cannot tell (released: 1024)
K, C = 16, 5  # codebook, classes of the tiny transformer: vocabulary 16 + 5 + [MASK] = 22


def _transformer_io():
    io = np.load(FIXTURES / "transformer_io.npz")
    return io["input_ids"], torch.from_numpy(io["logits"])


def _logits(model, input_ids):
    tokens, labels = mg.to_musefast_inputs(input_ids, model)
    with torch.no_grad():
        return model(tokens, class_labels=labels)


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- transformer -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", None])
def test_logits_match_maskgit(backend):
    model = mg.load_transformer(TRANSFORMER, TINY, backend=backend)
    input_ids, logits = _transformer_io()
    # maskgit's generate_samples reads logits[..., :codebook_size]; the class token's row is dropped
    torch.testing.assert_close(_logits(model, input_ids), logits[:, 1:, :K], rtol=1e-5, atol=1e-5)


def test_converted_transformer_config():
    model = mg.load_transformer(TRANSFORMER, TINY)
    c = model.config
    assert (c.codebook_size, c.num_classes, c.grid_size, c.dim, c.depth, c.num_heads, c.mlp_hidden_dim) == \
        (16, 5, 4, 32, 2, 2, 48)
    assert (c.norm_position, c.embed_norm, c.gelu_approximate, c.norm_eps) == ("post", True, "tanh", 1e-12)


def test_saved_musefast_copy_gives_the_same_logits(tmp_path):
    model = mg.load_transformer(TRANSFORMER, TINY)
    save_component(model, tmp_path / "m")  # the new config fields round-trip
    input_ids, _ = _transformer_io()
    torch.testing.assert_close(_logits(load_component(tmp_path / "m"), input_ids), _logits(model, input_ids))


def _released(name):
    shapes = json.loads((FIXTURES / "released_shapes.json").read_text())[name]
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}  # no memory


def _assert_maps_onto(state, model):
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == own


@pytest.mark.parametrize("size, grid", [(256, 16), (512, 32)])
def test_released_transformers_map_exactly_with_the_default_config(size, grid):
    params = mg.read_params(_released(f"maskgit_imagenet{size}"))
    cfg = mg.transformer_config(params)
    assert (cfg.codebook_size, cfg.num_classes, cfg.grid_size, cfg.dim, cfg.depth, cfg.num_heads,
            cfg.mlp_hidden_dim) == (1024, 1000, grid, 768, 24, 16, 3072)
    with torch.device("meta"):
        _assert_maps_onto(mg.transformer_state(params, cfg), MuseTransformer(cfg))


def test_released_tokenizer_maps_exactly():
    params = mg.read_params(_released("tokenizer_imagenet256"))
    cfg = mg.vqgan_config(params)
    assert (cfg.channels, cfg.channel_mult, cfg.num_res_blocks, cfg.embed_dim, cfg.codebook_size) == \
        (128, (1, 1, 2, 2, 4), 2, 256, 1024)
    with torch.device("meta"):
        _assert_maps_onto(mg.vqgan_state(params, cfg), VQGAN(cfg))


def test_every_checkpoint_form_gives_the_same_model(tmp_path):
    want = mg.load_transformer(TRANSFORMER, TINY)
    tree = _msgpack.load(TRANSFORMER)  # {"params": {...}} of numpy arrays
    flat = {f"params/{k}": v.numpy() for k, v in mg.read_params(tree).items()}
    np.savez(tmp_path / "flat.npz", **flat)
    folder = tmp_path / "ckpt"  # flax.training.checkpoints (msgpack): the newest step is read
    folder.mkdir()
    (folder / "checkpoint_10").write_bytes(TRANSFORMER.read_bytes())
    (folder / "checkpoint_9").write_bytes(b"not read")
    (folder / "checkpoint_10.tmp").write_bytes(b"not read")
    optimizer = {"target": {"params": tree["params"]}, "state": {"step": 3, "param_states": {"m": np.zeros(2)}}}
    train_state = {"step": 3, "params": tree["params"], "opt_state": {"0": {"mu": {"x": np.zeros(2)}}}}
    sources = [tmp_path / "flat.npz", str(folder), tree, tree["params"], flat, optimizer, train_state]
    for source in sources:
        assert _state_equal(mg.load_transformer(source, TINY), want), source


def test_config_in_maskgit_names_is_read_and_checked():
    nested = {"num_class": 5, "image_size": 64, "vqvae": {"codebook_size": 16},
              "transformer": {"num_layers": 2, "num_embeds": 32, "num_heads": 2, "patch_size": 16,
                              "mask_token_id": -1, "dropout_rate": 0.1}, "seed": 42}
    assert mg.load_transformer(TRANSFORMER, nested).config.grid_size == 4
    with pytest.raises(ConversionError, match=r"Embed_0/word_embeddings/embedding: checkpoint \(22, 32\) vs "
                                              r"expected \(21, 32\)"):
        mg.load_transformer(TRANSFORMER, {"codebook_size": 16, "num_class": 4})
    with pytest.raises(ConversionError, match=r"missing keys \(16\): TransformerLayer_2/"):
        mg.load_transformer(TRANSFORMER, {"codebook_size": 16, "num_layers": 3})
    with pytest.raises(ConversionError, match="shape mismatches"):
        mg.load_transformer(TRANSFORMER, {"codebook_size": 16, "num_heads": 4})
    with pytest.raises(ValueError, match="cannot hold codebook_size=1024"):  # the released default
        mg.load_transformer(TRANSFORMER)
    with pytest.raises(ValueError, match="mask_token_id=3"):
        mg.load_transformer(TRANSFORMER, {"codebook_size": 16, "mask_token_id": 3})
    with pytest.raises(TypeError, match="mapping"):
        mg.load_transformer(TRANSFORMER, [("codebook_size", 16)])


def test_unknown_missing_and_mismatched_keys_are_listed():
    params = mg.read_params(TRANSFORMER)
    extra = dict(params, **{"TransformerLayer_0/extra/kernel": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"unknown keys \(1\): TransformerLayer_0/extra/kernel"):
        mg.load_transformer(extra, TINY)
    missing = {k: v for k, v in params.items() if k != "TransformerLayer_1/Mlp_0/layer_output/bias"}
    with pytest.raises(ConversionError, match=r"missing keys \(1\): TransformerLayer_1/Mlp_0/layer_output/bias"):
        mg.load_transformer(missing, TINY)
    wrong = dict(params, **{"MlmLayer_0/mlm_bias/bias": torch.zeros(21)})
    with pytest.raises(ConversionError, match=r"MlmLayer_0/mlm_bias/bias: checkpoint \(21,\) vs expected \(22,\)"):
        mg.load_transformer(wrong, TINY)
    with pytest.raises(ConversionError, match="cannot read the architecture.*Embed_0/word_embeddings"):
        mg.load_transformer(mg.read_params(TOKENIZER), TINY)  # a tokenizer is not a transformer
    with pytest.raises(ConversionError, match="not a numeric array"):
        mg.load_transformer(dict(params, **{"Embed_0/note": "text"}), TINY)


def test_maskgit_inputs_map_to_musefast_tokens_and_labels():
    model = mg.load_transformer(TRANSFORMER, TINY)
    ids = np.array([[16 + 4, -1, 3, 21] + [0] * 13], np.int32)  # class 4, [MASK] as -1 and as row 21
    tokens, labels = mg.to_musefast_inputs(ids, model)
    assert labels.tolist() == [4] and tokens[0, :3].tolist() == [16, 3, 16]
    with pytest.raises(ValueError, match="class token"):
        mg.to_musefast_inputs(np.array([[3] + [0] * 16]), model)
    with pytest.raises(ValueError, match=r"image ids must lie in \[0, 16\)"):
        mg.to_musefast_inputs(np.array([[16, 17] + [0] * 15]), model)
    with pytest.raises(ValueError, match=r"\(B, 1 \+ 16\)"):
        mg.to_musefast_inputs(np.zeros((1, 16), np.int64), model)


def test_null_class_gives_guidance_logits():
    model = mg.load_transformer(TRANSFORMER, TINY)
    tokens = torch.full((2, 16), model.mask_token_id)
    with torch.no_grad():
        cond = model(tokens, class_labels=torch.tensor([1, 2]))
        uncond = model(tokens, class_labels=torch.full((2,), C))  # id num_classes: the null class
    assert uncond.shape == cond.shape and torch.isfinite(uncond).all()
    assert not torch.allclose(cond, uncond)
    sampler = MaskGitSampler(mg.PRESET, num_steps=4, guidance_scale=3.0, progress=False)

    def guided(t):
        return model(t, class_labels=torch.tensor([1, 2])), model(t, class_labels=torch.full((2,), C))

    with torch.no_grad():
        out = sampler(guided, tokens.view(2, 4, 4), mask_token_id=model.mask_token_id, seed=5)
        again = sampler(guided, tokens.view(2, 4, 4), mask_token_id=model.mask_token_id, seed=5)
    assert torch.equal(out, again) and int(out.max()) < K


def test_maskgit_preset_samples_deterministically_and_decodes():
    model = mg.load_transformer(TRANSFORMER, TINY)
    vq = mg.load_vqgan(TOKENIZER)
    input_ids, _ = _transformer_io()
    tokens, labels = mg.to_musefast_inputs(input_ids, model)  # partly masked rows: editing
    sampler = MaskGitSampler(mg.PRESET, num_steps=6, progress=False)

    def run(seed):
        with torch.no_grad():
            return sampler(lambda t: model(t, class_labels=labels), tokens.view(3, 4, 4),
                           mask_token_id=model.mask_token_id, seed=seed)

    out = run(0)
    assert torch.equal(out, run(0))
    assert not torch.equal(out, run(1))
    known = tokens.view(3, 4, 4) != model.mask_token_id
    assert torch.equal(out[known], tokens.view(3, 4, 4)[known]) and int(out.max()) < K
    images = vq.decode(out)
    assert images.shape == (3, 3, 8, 8) and float(images.min()) >= 0 and float(images.max()) <= 1


# -- tokenizer ---------------------------------------------------------------------------------

def test_tokenizer_features_tokens_and_reconstructions_match_maskgit():
    io = np.load(FIXTURES / "tokenizer_io.npz")
    vq = mg.load_vqgan(TOKENIZER)
    image = torch.from_numpy(io["image"]).permute(0, 3, 1, 2)  # NHWC -> NCHW
    want_tokens = torch.from_numpy(io["tokens"]).long()
    with torch.no_grad():
        features = vq.encode_features(image)
        torch.testing.assert_close(features, torch.from_numpy(io["features"]).permute(0, 3, 1, 2),
                                   rtol=1e-5, atol=1e-5)
        tokens = vq.encode(image)
        differ = tokens != want_tokens
        if differ.any():  # legal only at near-ties of the distances
            d = torch.from_numpy(io["distances"])
            ours, theirs = d.gather(1, tokens.reshape(-1, 1)), d.gather(1, want_tokens.reshape(-1, 1))
            assert (ours - theirs).abs().max() < 1e-4
        assert int(differ.sum()) <= 1 and want_tokens.unique().numel() > 8
        decoded = torch.from_numpy(io["decoded"]).permute(0, 3, 1, 2)
        torch.testing.assert_close(vq.decode_features(vq.quantize.lookup(want_tokens)), decoded, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vq.decode(want_tokens), decoded.clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_tokenizer_errors():
    params = mg.read_params(TOKENIZER)
    with pytest.raises(ConversionError, match=r"unknown keys \(1\): encoder/ResBlock_0/Attention_0/kernel"):
        mg.load_vqgan(dict(params, **{"encoder/ResBlock_0/Attention_0/kernel": torch.zeros(1)}))
    with pytest.raises(ConversionError, match=r"quantizer/codebook: checkpoint \(16, 8\) vs expected \(32, 8\)"):
        mg.load_vqgan(TOKENIZER, {"vqvae": {"codebook_size": 32}})
    with pytest.raises(ConversionError, match=r"missing keys"):
        mg.load_vqgan(TOKENIZER, {"channel_multipliers": [1, 1, 1]})
    with pytest.raises(ValueError, match="norm_type='BN'.*activation_fn='relu'.*conv_downsample"):
        mg.load_vqgan(TOKENIZER, {"norm_type": "BN", "activation_fn": "relu", "conv_downsample": True})
    with pytest.raises(ValueError, match=r"channel_multipliers\[0\] != 1"):
        mg.load_vqgan(TOKENIZER, {"channel_multipliers": [2, 1]})
    assert mg.load_vqgan(TOKENIZER, {"filters": 32, "num_res_blocks": 1, "embedding_dim": 8}).config.channels == 32


# -- reading files -----------------------------------------------------------------------------

def test_corrupt_or_missing_checkpoint_files(tmp_path):
    data = TRANSFORMER.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(_msgpack.MsgpackError, match="cut: not a flax msgpack checkpoint.*truncated"):
        mg.load_transformer(tmp_path / "cut", TINY)
    (tmp_path / "number").write_bytes(b"\x05")
    with pytest.raises(_msgpack.MsgpackError, match="holds a map, not int"):
        mg.load_transformer(tmp_path / "number", TINY)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        mg.load_transformer(tmp_path / "absent", TINY)
    with pytest.raises(FileNotFoundError, match=r"checkpoint_<step>"):
        mg.load_transformer(tmp_path, TINY)


# -- the msgpack reader ------------------------------------------------------------------------

def test_msgpack_reader_decodes_what_flax_writes():
    tree = _msgpack.load(FIXTURES / "msgpack_cases.msgpack")
    assert tree["ints"] == [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1,
                            -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]
    assert tree["floats"] == [0.5, -2.25, 1e300]
    assert tree["misc"] == [True, False, None, "", "x" * 40, "y" * 300, b"\x00\x01", b"z" * 300]
    assert tree["big_map"] == {f"k{i:02d}": i for i in range(20)} and tree["big_list"] == list(range(20))
    a = tree["arrays"]
    expected = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 4, "f16": np.array([1.5, -0.25], np.float16),
                "f64": np.array([[1e-300]]), "bf16": np.array([1.0, -2.5, 3.0040553e38], np.float32),
                "i8": np.array([-128, 127], np.int8), "i32": np.array([-(2**31), 2**31 - 1], np.int32),
                "i64": np.array([-(2**63)], np.int64), "u8": np.array([0, 255], np.uint8),
                "bool": np.array([True, False, True]), "c64": np.array([1 + 2j], np.complex64),
                "empty": np.zeros((0, 3), np.float32), "scalar_array": np.array(3.5, np.float32)}
    assert a.keys() == expected.keys()
    for name, want in expected.items():
        assert a[name].dtype == want.dtype and a[name].shape == want.shape and np.array_equal(a[name], want), name
    assert a["f32"].flags.writeable  # torch.from_numpy without copies or warnings
    assert tree["np_scalar"] == np.float32(0.75) and isinstance(tree["np_scalar"], np.float32)
    assert tree["np_int"] == -5 and isinstance(tree["np_int"], np.int64)
    assert tree["complex"] == 1.5 - 2j


def test_msgpack_reader_joins_chunked_arrays():
    tree = _msgpack.load(FIXTURES / "msgpack_chunked.msgpack")
    assert np.array_equal(tree["w"], np.arange(10, dtype=np.float32).reshape(2, 5))


def _ext(code: int, payload: bytes) -> bytes:
    return b"\xc7" + bytes([len(payload), code]) + payload


def _array_payload(shape: bytes, dtype: bytes, data: bytes) -> bytes:
    return b"\x93" + shape + bytes([0xA0 + len(dtype)]) + dtype + b"\xc4" + bytes([len(data)]) + data


def test_msgpack_reader_hand_made_encodings():
    assert _msgpack.loads(b"\xca" + struct.pack(">f", 1.5)) == 1.5  # float 32
    assert _msgpack.loads(b"\xdd\x00\x00\x00\x02\x01\xc0") == [1, None]  # array 32
    assert _msgpack.loads(b"\xdf\x00\x00\x00\x01\xd9\x01a\x02") == {"a": 2}  # map 32, str 8
    assert _msgpack.loads(b"\xdb\x00\x00\x00\x01b") == "b"  # str 32
    assert _msgpack.loads(b"\xc6\x00\x00\x00\x02hi") == b"hi"  # bin 32
    int16 = _array_payload(b"\x91\x02", b"int16", b"\x01\x00\xff\xff")  # row-major little-endian bytes
    assert _msgpack.loads(_ext(1, int16)).tolist() == [1, -1]
    assert _msgpack.loads(b"\x81\xa1k" + _ext(1, _array_payload(b"\x90", b"float64", struct.pack("<d", 2.5))))["k"] \
        == np.array(2.5)


@pytest.mark.parametrize("data, message", [
    (b"\xc1", "reserved msgpack byte 0xc1"),
    (b"\x01\x02", "1 trailing bytes"),
    (b"\xcd\x01", "truncated"),
    (b"\xdd\xff\xff\xff\xff", "array of 4294967295 elements"),  # refused before allocating
    (b"\xdf\xff\xff\xff\xff", "map of 4294967295 entries"),
    (b"\x91" * 100 + b"\x00", "max_depth=64"),
    (b"\x81\x01\x02", "map key .* is a int"),
    (b"\x82\xa1a\x01\xa1a\x02", "duplicate map key 'a'"),
    (b"\xa1\xff", "invalid UTF-8"),
    (b"\xd4\x07\x00", "unsupported msgpack extension type 7"),
    (b"\xd6\xff\x00\x00\x00\x00", "unsupported msgpack extension type -1"),  # timestamps
    (_ext(1, _array_payload(b"\x91\x02", b"object", b"\x00" * 16)), "unsupported dtype 'object'"),
    (_ext(1, _array_payload(b"\x91\x03", b"float32", b"\x00" * 8)), "8 bytes for shape \\(3,\\)"),
    (_ext(1, _array_payload(b"\x91\xff", b"float32", b"")), "bad shape \\[-1\\]"),
    (_ext(1, b"\x92\x90\xa4int8"), "expected \\[shape, dtype, data\\]"),
    (_ext(1, _array_payload(b"\x90", b"int8", b"\x01") + b"\x00"), "1 stray bytes inside"),
    (_ext(2, b"\x91\x01"), "not \\[real, imag\\]"),
    (b"\x83\xb9__msgpack_chunked_array__\xc3\xa5shape\x81\xa10\x02\xa6chunks\x80", "chunks must be 1-d arrays"),
])
def test_msgpack_reader_rejects_malformed_input(data, message):
    with pytest.raises(_msgpack.MsgpackError, match=message):
        _msgpack.loads(data)
