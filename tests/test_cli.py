"""The musefast CLI on a tiny saved pipeline."""
import numpy as np
import pytest
from PIL import Image

from musefast.cli import main
from musefast.models.text import load_text_encoder
from musefast.pipelines.random_init import random_pipeline
from tiny_text import make_tiny_t5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    t5 = load_text_encoder(make_tiny_t5(root / "t5"))
    return str(random_pipeline("tiny", text_encoder=t5).save_pretrained(root / "model"))


@pytest.fixture
def image_and_mask(tmp_path):
    rng = np.random.default_rng(0)
    img = tmp_path / "img.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(img)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), ((0, 16), (0, 16)))).save(mask)
    small = tmp_path / "small.png"
    Image.fromarray((rng.random((32, 24, 3)) * 255).astype(np.uint8)).save(small)
    return img, mask, small


def test_generate_writes_an_image(model_dir, tmp_path):
    out = tmp_path / "out.png"
    assert main(["generate", "a red cat", "--model", model_dir, "--steps", "3", "--seed", "1", "-q", "-o", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    assert main(["generate", "a cat", "--model", model_dir, "--steps", "2", "-n", "2", "-q", "--guidance", "1",
                 "--backend", "reference", "--dtype", "fp32", "-o", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m_0.png").is_file() and (tmp_path / "m_1.png").is_file()


def test_inpaint_outpaint_edit(model_dir, image_and_mask, tmp_path):
    img, mask, small = image_and_mask
    common = ["--model", model_dir, "--steps", "2", "-q", "--seed", "0"]
    assert main(["inpaint", str(img), str(mask), "a dog", *common, "-o", str(tmp_path / "i.png")]) == 0
    assert main(["outpaint", str(small), "a tree", "--left", "8", *common, "-o", str(tmp_path / "o.png")]) == 0
    edit_args = ["--model", model_dir, "-q", "--seed", "0", "--iterations", "2"]
    assert main(["edit", str(img), "a blue dog", *edit_args, "-o", str(tmp_path / "e.png")]) == 0
    for name in "ioe":
        assert Image.open(tmp_path / f"{name}.png").size == (32, 32)


def test_clear_errors(model_dir, image_and_mask, tmp_path, capsys):
    """Ordinary mistakes: one line on stderr naming the problem, exit code 2 (usage) or 1 (model)."""
    img, mask, small = image_and_mask
    cases = [
        (["inpaint", str(tmp_path / "nope.png"), str(mask), "x", "--model", model_dir], 2, "image file not found"),
        (["inpaint", str(img), str(small), "x", "--model", model_dir, "-q"], 2, "mask is 24×32 but the image is 32×32"),
        (["edit", str(small), "x", "--model", model_dir, "-q"], 2, "image is 24×32 (width×height)"),
        (["edit", str(img), "x", "--model", model_dir, "--steps", "3"], 2, "--steps does not apply"),
        (["generate", "x", "--model", model_dir, "-q", "--backend", "cfg_sample_remask=cuda"], 2,
         "cannot run these inputs"),
        (["generate", "x", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "m.png")], 1,
         "model folder not found"),
        (["generate", "", "--model", model_dir, "-q"], 2, "PROMPT must be a non-empty caption"),
        (["edit", str(img), "  ", "--model", model_dir, "-q"], 2, "PROMPT must be a non-empty caption"),
    ]
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert err.strip().count("\n") == 0, err  # one line


def test_backend_flag_does_not_leak(model_dir, tmp_path, monkeypatch):
    import os

    monkeypatch.delenv("MUSEFAST_BACKEND", raising=False)
    main(["generate", "x", "--model", model_dir, "--steps", "1", "-q", "--backend", "reference",
          "-o", str(tmp_path / "x.png")])
    assert "MUSEFAST_BACKEND" not in os.environ


def test_first_use_compiles_in_the_background_and_runs_on_pure_backends(model_dir, tmp_path, monkeypatch, capsys):
    """A fresh machine: nothing in the JIT cache. The command must not wait for the compiler;
    it starts the build detached and runs on the PyTorch backends."""
    import subprocess

    from musefast import _build

    monkeypatch.setenv("MUSEFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_build, "_state", {"tried": False, "module": None, "error": None, "how": None,
                                           "seconds": None})
    monkeypatch.setattr(_build, "_aot_module_present", lambda: False)
    started = []

    class FakeBuild:
        def __init__(self, cmd, **kw):
            started.append(cmd)
            self.pid = 2 ** 22 + 12345  # no such process: a later call may start a build again

    monkeypatch.setattr(subprocess, "Popen", FakeBuild)
    assert _build.needs_first_build()
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "-o", str(out), "--model", model_dir, "--steps", "2", "-q"]) == 0
    assert out.is_file() and len(started) == 1 and "_build.extension()" in started[0][-1]
    assert not _build.needs_first_build()  # tried: this process stays on the pure backends
    assert "background" in _build.extension_status()["error"]
    # --quiet silences the note; without it the user is told what happens
    monkeypatch.setattr(_build, "_state", {"tried": False, "module": None, "error": None, "how": None,
                                           "seconds": None})
    assert main(["generate", "a red circle", "-o", str(out), "--model", model_dir, "--steps", "2"]) == 0
    assert "compiling the C++ kernels in the background" in capsys.readouterr().err
    # --wait-for-build: no background process
    monkeypatch.setattr(_build, "_state", {"tried": True, "module": None, "error": "off", "how": None,
                                           "seconds": None})
    started.clear()
    assert main(["generate", "a red circle", "-o", str(out), "--model", model_dir, "--steps", "2", "-q",
                 "--wait-for-build"]) == 0
    assert started == []
