"""How the demo text encoder reads prompts: case and punctuation do not matter,
unknown words are named in one warning, over-long prompts are reported."""
import warnings

import pytest
import torch

import musefast
from musefast.demo_data.checker import check


@pytest.fixture(scope="module")
def demo():
    pipe = musefast.load("demo")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return [str(w.message) for w in caught], result


def test_case_and_punctuation_are_normalised(demo):
    enc = demo.text_encoder
    messages, plain = _warnings(lambda: enc.tokenize(["a red circle on the left"]))
    _, shouted = _warnings(lambda: enc.tokenize(["  A Red Circle, On The LEFT!. "]))
    assert messages == [] and torch.equal(plain[0], shouted[0]) and torch.equal(plain[1], shouted[1])
    image = demo("A Red Circle On The Left.", seed=0)[0]
    assert check(image, "a red circle on the left")["exact"]


def test_unknown_words_are_named_once_and_dropped(demo):
    enc = demo.text_encoder
    messages, ids = _warnings(lambda: enc.tokenize(["a cowboy riding a horse 🐎", "a red circle on the left"]))
    assert len(messages) == 1
    assert "'cowboy', 'riding', 'horse', '🐎'" in messages[0] and "It knows only: a above an" in messages[0]
    assert torch.equal(ids[0][0], enc.tokenize(["a a"])[0][0])


def test_too_long_prompts_are_reported(demo):
    long = "a red circle on the left of a blue square " * 3
    messages, _ = _warnings(lambda: demo.text_encoder.tokenize([long]))
    assert len(messages) == 1 and "tokens long but this text encoder reads 16" in messages[0]


def test_cli_warns_on_stderr_and_still_succeeds(tmp_path, capsys):
    from musefast.cli import main

    assert main(["generate", "a cowboy on the left", "--seed", "0", "-q", "-o", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("musefast: warning: this text encoder does not know the word(s) 'cowboy'")
    assert err.count("\n") == 1


def test_captions_outside_the_demo_grammar_are_named(demo):
    """Known words in a shape the demo never saw (three shapes) warn once, naming the caption;
    a caption of the grammar gives no warning."""
    three = "a red circle above a blue square below a green ring"
    messages, _ = _warnings(lambda: demo([three, three], num_steps=1, seed=0))
    grammar = [m for m in messages if "one- and two-shape captions" in m]
    assert len(grammar) == 1 and three in grammar[0], messages
    messages, _ = _warnings(lambda: demo("a red circle above a blue square", num_steps=1, seed=0))
    assert not [m for m in messages if "one- and two-shape captions" in m], messages
