"""The CLI as a new user meets it: mistakes give one line and exit code 2 before any
model loads, broken models name the file, seeds are printed and stored, --help is complete."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import musefast
from musefast import cli
from musefast.cli import build_parser, main
from musefast.image_metadata import read_params
from musefast.models.text import load_text_encoder
from musefast.pipelines.random_init import random_pipeline
from tiny_text import make_tiny_t5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("surface")
    t5 = load_text_encoder(make_tiny_t5(root / "t5"))
    return str(random_pipeline("tiny", text_encoder=t5).save_pretrained(root / "model"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Usage errors must be found before the (slow) model load: loading fails the test."""
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(musefast, "load", forbidden)


def _run(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "musefast", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_python_dash_m_version_and_a_usage_error_without_traceback(tmp_path):
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"musefast {musefast.__version__}"
    r = _run("generate", "a red circle on the left", "-o", str(tmp_path / "x.txt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"musefast generate: error: -o {tmp_path / 'x.txt'}: unsupported image type '.txt'; "
                                f"use one of .png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff (e.g. -o {tmp_path / 'x.png'})")
    r = _run("generate", "a red circle", "--seed", "-3")
    assert r.returncode == 2 and "argument --seed: must be in [0, 2**63 - 1], got -3" in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["-o", "{tmp}/"], "is a folder; give a file name"),
    (["-o", "{tmp}/file.png/x.png"], "is a file, not a folder"),
    (["-o", "/proc/x.png"], "cannot write in /proc"),
    (["--device", "tpu"], "--device tpu: not a device; use cpu, cuda or cuda:N"),
    (["--from-png", "{tmp}/none.png"], "file not found"),
])
def test_output_and_device_errors_before_the_model_loads(argv, message, tmp_path, capsys, no_model_load):
    (tmp_path / "file.png").write_bytes(b"")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["generate", "a red circle on the left", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine(capsys, no_model_load, tmp_path):
    assert main(["generate", "x", "--device", "cuda", "-o", str(tmp_path / "a.png")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--steps", "0", "must be at least 1"), ("--guidance", "-1", "finite number >= 0"),
    ("--guidance", "nan", "finite number >= 0"), ("-n", "x", "'x' is not an integer"),
])
def test_numbers_are_checked_by_the_parser(option, value, message, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_broken_models_name_the_file(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "transformer" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = ["-o", str(tmp_path / "o.png"), "-q"]
    assert main(["generate", "x", "--model", str(broken), *out]) == 1
    err = capsys.readouterr().err
    assert f"{weights}: corrupt or truncated weights file" in err and err.count("\n") == 1, err
    (broken / "vqgan" / "config.json").write_text("{not json")
    assert main(["generate", "x", "--model", str(broken), *out]) == 1
    assert f"{broken / 'vqgan' / 'config.json'}: invalid JSON" in capsys.readouterr().err


def test_missing_relative_paths_never_reach_the_hub(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    asked = []

    def offline(repo_id, **kw):
        asked.append(repo_id)
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "x", "--model", "./models/mine", "-q"]) == 1
    assert "model folder not found" in capsys.readouterr().err and asked == []
    # shaped like owner/name and no such folder: the hub is asked, and its failure is one line
    assert main(["generate", "x", "--model", "models/mine", "-q"]) == 1
    err = capsys.readouterr().err
    assert asked == ["models/mine"] and "is not a local folder" in err and err.count("\n") == 1, err


def test_debug_shows_the_traceback(tmp_path):
    r = _run("generate", "x", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "a.png"), "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_seed_is_drawn_printed_stored_and_replayed(model_dir, tmp_path, capsys):
    first = tmp_path / "first.png"
    assert main(["generate", "a red cat", "--model", model_dir, "--steps", "2", "-o", str(first)]) == 0
    captured = capsys.readouterr()
    seed_lines = [line for line in captured.err.splitlines() if line.startswith("seed: ")]
    assert len(seed_lines) == 1 and captured.out.strip() == str(first)
    params = read_params(first)
    assert params["seed"] == int(seed_lines[0].split()[1]) and params["prompt"] == "a red cat"
    assert params["steps"] == 2 and params["model"] == model_dir and params["version"] == musefast.__version__
    assert {"negative_prompt", "guidance_scale", "sampler"} <= set(params)
    # every setting that determines the image, as the engine resolved it for this model
    from musefast.generation import Request

    request = params["request"]
    assert request["seed"] == params["seed"] and request["num_steps"] == 2 and request["family"] == "muse"
    assert {"guidance_schedule", "temperature", "choice_temperature", "size", "cache"} <= set(request)
    assert Request.from_metadata(request).to_metadata() == request
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "-o", str(again), "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    # image i of -n N has seed SEED + i: it is the one-image run of that seed, and its PNG says so
    assert main(["generate", "a blue dog", "--model", model_dir, "--steps", "2", "-n", "2", "-q", "--seed", "4",
                 "-o", str(tmp_path / "b.png")]) == 0
    assert read_params(tmp_path / "b_1.png")["seed"] == 5
    assert main(["generate", "a blue dog", "--model", model_dir, "--steps", "2", "-q", "--seed", "5",
                 "-o", str(tmp_path / "solo.png")]) == 0
    assert (tmp_path / "solo.png").read_bytes() == (tmp_path / "b_1.png").read_bytes()
    assert main(["generate", "--from-png", str(tmp_path / "b_1.png"), "-o", str(tmp_path / "b1.png"), "-q"]) == 0
    assert (tmp_path / "b1.png").read_bytes() == (tmp_path / "b_1.png").read_bytes()


def test_quiet_prints_only_the_paths(model_dir, tmp_path, capfd):
    out = tmp_path / "q.png"
    assert main(["generate", "a red cat", "--model", model_dir, "--steps", "2", "-q", "-o", str(out)]) == 0
    captured = capfd.readouterr()
    assert captured.out == f"{out}\n" and captured.err == ""


def test_loading_and_saving_draw_no_bars(model_dir, tmp_path, capfd):
    pipe = musefast.load(model_dir)
    pipe.save_pretrained(tmp_path / "copy")
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err


def test_help_gives_every_option_a_text_and_a_default():
    parser = build_parser(["generate"])
    commands = parser._subparsers._group_actions[0].choices
    for name in ("generate", "inpaint", "outpaint", "edit"):
        for action in commands[name]._actions:
            if action.help == "==SUPPRESS==" or not action.option_strings or action.nargs == 0:
                continue  # flags (store_true, --help) have no default to show
            assert action.help, (name, action.dest)
            assert "default" in action.help or action.choices, (name, action.dest, action.help)
    text = " ".join(commands["generate"].format_help().split())
    demo = json.loads(cli._DEMO_INDEX.read_text())["settings"]
    assert f"demo: {demo['num_steps']}" in text and "(default: out.png)" in text


def test_threads_option_and_demo_default(model_dir, tmp_path, monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = ["-q", "--steps", "1", "--seed", "0", "-o", str(tmp_path / "t.png")]
    assert main(["generate", "a red circle on the left", *out]) == 0  # the demo: one thread
    assert main(["generate", "a cat", "--model", model_dir, "--threads", "3", *out]) == 0
    assert main(["generate", "a cat", "--model", model_dir, *out]) == 0  # other models: torch's default
    restored = torch.get_num_threads()
    assert seen == [1, restored, 3, restored, restored]
