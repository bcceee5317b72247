"""Text encoders on tiny random T5 and CLIP models built offline (tests/tiny_text.py)."""
import shutil

import pytest
import torch

from musefast.models import (
    CLIPTextEncoder,
    T5TextEncoder,
    TextEmbeddings,
    TextProjection,
    as_text_embeddings,
    load_text_encoder,
)
from tiny_text import make_tiny_clip, make_tiny_t5

PROMPTS = ["a photo of a cat", "the red dog!"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", max_length=16)


@pytest.fixture
def t5(t5_dir):
    return T5TextEncoder.from_pretrained(t5_dir, max_length=12)


@pytest.fixture
def clip(clip_dir):
    return CLIPTextEncoder.from_pretrained(clip_dir)


def count_forwards(encoder):
    calls = []
    encoder.model.register_forward_hook(lambda m, a, k, out: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    return calls


def test_t5_shapes_mask_and_values(t5):
    emb = t5.encode(PROMPTS)
    assert emb.hidden.shape == (2, 12, 32) and emb.hidden.dtype == torch.float32
    assert emb.mask.dtype == torch.bool and emb.pooled is None
    # "▁a ▁photo ▁of ▁a ▁cat </s>" and "▁the ▁red ▁dog ! </s>"
    assert emb.mask.sum(1).tolist() == [6, 5]
    assert not emb.mask[:, 6:].any()
    ids, mask = t5.tokenize(PROMPTS)
    direct = t5.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.equal(emb.hidden, direct)
    assert (t5.hidden_size, t5.pooled_size) == (32, None)


def test_t5_default_max_length(t5_dir):
    # the tokenizer says 512; the encoder caps the default at 128
    assert T5TextEncoder.from_pretrained(t5_dir).max_length == 128


def test_clip_penultimate_hidden_pooled_and_padding(clip):
    assert clip.max_length == 16  # the tokenizer's model_max_length
    emb = clip.encode(PROMPTS)
    assert emb.hidden.shape == (2, 16, 32) and emb.pooled.shape == (2, 24)
    assert emb.mask.all()  # aMUSEd: padding tokens are attended
    ids, mask = clip.tokenize(PROMPTS)
    assert mask.sum(1).tolist() == [7, 6]  # <start> a photo of a cat <end>, the rest padding
    out = clip.model(input_ids=ids, output_hidden_states=True)  # no attention mask, as aMUSEd
    assert torch.equal(emb.hidden, out.hidden_states[-2])
    assert not torch.allclose(emb.hidden, out.last_hidden_state)
    assert torch.equal(emb.pooled, out.text_embeds)
    assert (clip.hidden_size, clip.pooled_size) == (32, 24)


def test_clip_options(clip_dir):
    enc = CLIPTextEncoder.from_pretrained(clip_dir, attend_padding=False, hidden_layer=-1, max_length=10)
    emb = enc.encode(PROMPTS)
    assert emb.mask.sum(1).tolist() == [7, 6] and emb.hidden.shape == (2, 10, 32)
    ids, _ = enc.tokenize(PROMPTS)
    assert torch.equal(emb.hidden, enc.model(input_ids=ids, output_hidden_states=True).hidden_states[-1])
    with pytest.raises(ValueError, match="exceeds the model's 16 position embeddings"):
        CLIPTextEncoder.from_pretrained(clip_dir, max_length=17)
    with pytest.raises(ValueError, match="hidden_layer=5 is out of range"):
        CLIPTextEncoder.from_pretrained(clip_dir, hidden_layer=5)


@pytest.mark.parametrize("which", ["t5", "clip"])
def test_cache_of_repeated_prompts(which, request):
    enc = request.getfixturevalue(which)
    enc.cache_size = 2
    calls = count_forwards(enc)
    first = enc.encode_cached(["", "", "blurry"])
    assert calls == [2]  # the two distinct prompts, in one batch
    assert first.batch_size == 3 and torch.equal(first.hidden[0], first.hidden[1])
    again = enc.encode_cached(["blurry", ""])
    assert calls == [2]  # all hits: no forward
    assert torch.equal(again.hidden[0], first.hidden[2]) and torch.equal(again.hidden[1], first.hidden[0])
    assert torch.equal(again.mask, first.mask[[2, 0]])
    if first.pooled is not None:
        assert torch.equal(again.pooled, first.pooled[[2, 0]])
    torch.testing.assert_close(first.hidden, enc.encode(["", "", "blurry"]).hidden)  # same as uncached
    assert calls == [2, 3]
    enc.encode_cached(["cat"])  # LRU of 2: "" was used after "blurry", so "blurry" is evicted
    assert calls == [2, 3, 1]
    enc.encode_cached([""])
    assert calls == [2, 3, 1]
    enc.encode_cached(["blurry"])
    assert calls == [2, 3, 1, 1]
    enc.to("cpu")  # moving the module drops the cache (entries would be on the old device)
    enc.encode_cached([""])
    assert calls == [2, 3, 1, 1, 1]


def test_frozen(t5, clip):
    for enc in (t5, clip):
        assert not any(p.requires_grad for p in enc.parameters())
        enc.train()
        assert not enc.training and not any(m.training for m in enc.modules())
        with torch.enable_grad():
            assert not enc.encode("a cat").hidden.requires_grad


def test_precomputed_embeddings(clip):
    emb = clip.encode(PROMPTS)
    assert as_text_embeddings(emb, hidden_size=32, pooled_size=24, batch_size=2) is emb
    plain = as_text_embeddings(emb.hidden, hidden_size=32)
    assert plain.mask.all() and plain.mask.shape == (2, 16) and plain.pooled is None
    with pytest.raises(ValueError, match="prompt_embeds.hidden has width 32, the model expects 64"):
        as_text_embeddings(emb, hidden_size=64, name="prompt_embeds")
    with pytest.raises(ValueError, match="no pooled vector"):
        as_text_embeddings(emb.hidden, pooled_size=24)
    with pytest.raises(ValueError, match="pooled has size 24, the model expects 8"):
        as_text_embeddings(emb, pooled_size=8)
    with pytest.raises(ValueError, match="batch size 2, expected 3"):
        as_text_embeddings(emb, batch_size=3)
    with pytest.raises(ValueError, match="NaN or inf"):
        as_text_embeddings(TextEmbeddings(emb.hidden.clone().fill_(float("nan")), emb.mask))
    with pytest.raises(TypeError, match="TextEmbeddings or a"):
        as_text_embeddings([emb.hidden])
    with pytest.raises(ValueError, match=r"\(B, L, C\)"):
        as_text_embeddings(emb.hidden[0])
    with pytest.raises(ValueError, match="mask must be a"):
        TextEmbeddings(emb.hidden, emb.mask[:, :3])
    with pytest.raises(ValueError, match="pooled must be None or"):
        TextEmbeddings(emb.hidden, emb.mask, emb.pooled[:1])
    assert TextEmbeddings(emb.hidden, emb.mask.long()).mask.dtype == torch.bool


def test_text_embeddings_batch_helpers(clip):
    emb = clip.encode(PROMPTS)
    both = TextEmbeddings.cat([emb, emb[1]])
    assert both.batch_size == 3 and torch.equal(both.hidden[2], emb.hidden[1]) and torch.equal(both.pooled[2], emb.pooled[1])
    rep = emb.repeat_interleave(2)
    assert torch.equal(rep.hidden[1], emb.hidden[0]) and torch.equal(rep.hidden[2], emb.hidden[1])
    half = emb.to(dtype=torch.float16)
    assert half.hidden.dtype == half.pooled.dtype == torch.float16 and half.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="with and without pooled"):
        TextEmbeddings.cat([emb, TextEmbeddings(emb.hidden, emb.mask)])


def test_projection():
    proj = TextProjection(32, 48)
    assert proj(torch.randn(2, 16, 32)).shape == (2, 16, 48)


def test_bad_prompts(t5):
    with pytest.raises(ValueError, match="prompts is empty"):
        t5.encode([])
    with pytest.raises(TypeError, match="every prompt must be a str"):
        t5.encode(["ok", 3])
    with pytest.raises(TypeError, match="prompts must be a str or a list"):
        t5.encode(None)
    assert t5.encode("a cat").batch_size == 1


def test_missing_folders_never_download(tmp_path, t5_dir, clip_dir):
    with pytest.raises(FileNotFoundError, match="text encoder folder not found"):
        T5TextEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        T5TextEncoder.from_pretrained("./nope")
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        T5TextEncoder.from_pretrained(t5_dir, tmp_path / "no_tokenizer")
    with pytest.raises(OSError):  # a hub id with local_files_only: the (empty) cache only
        T5TextEncoder.from_pretrained("musefast-test/does-not-exist", local_files_only=True)
    with pytest.raises(ValueError, match="not a supported text encoder"):
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "config.json").write_text('{"model_type": "bert"}')
        load_text_encoder(bad)


def test_save_and_autodetect(tmp_path, t5_dir, clip_dir, clip):
    assert isinstance(load_text_encoder(t5_dir, max_length=12), T5TextEncoder)  # from config.json model_type
    clip_opts = CLIPTextEncoder(clip.model, clip.tokenizer, max_length=12, attend_padding=False)
    folder = clip_opts.save_pretrained(tmp_path / "saved")
    loaded = load_text_encoder(folder)
    assert isinstance(loaded, CLIPTextEncoder)
    assert (loaded.max_length, loaded.attend_padding, loaded.hidden_layer) == (12, False, -2)
    a, b = clip_opts.encode(PROMPTS), loaded.encode(PROMPTS)
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.mask, b.mask) and torch.equal(a.pooled, b.pooled)
    with pytest.raises(ValueError, match="holds a CLIPTextEncoder, not a T5TextEncoder"):
        T5TextEncoder.from_pretrained(folder)


def test_diffusers_layout_subfolders(tmp_path, clip_dir, clip):
    root = tmp_path / "pipe"
    (root / "text_encoder").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    for f in clip_dir.iterdir():
        dest = "tokenizer" if f.name.startswith("tokenizer") else "text_encoder"
        shutil.copy(f, root / dest / f.name)
    enc = CLIPTextEncoder.from_pretrained(root, subfolder="text_encoder", tokenizer_subfolder="tokenizer",
                                          dtype=torch.float64)
    assert enc.dtype == torch.float64
    emb = enc.encode(PROMPTS)
    torch.testing.assert_close(emb.pooled.float(), clip.encode(PROMPTS).pooled)
