"""The repository-root ``kernels/`` folder is musefast's, installed as ``musefast.kernels``; it
must never hide Hugging Face's top-level ``kernels`` (transformers 5 imports it, and diffusers'
aMUSEd pipelines import transformers).

Python puts the current folder first on ``sys.path`` for ``python -c``, ``python -m pytest``, a
REPL or a notebook, so every check runs in a fresh interpreter started in the repository root.
The "without Hugging Face's kernels" case runs on a copy of the import path whose site-packages
are symlink farms lacking that one distribution.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_TIMEOUT = 600  # importing diffusers (torch, transformers) takes tens of seconds on a loaded 2-core machine

# Run in the repository root: what `import kernels` gives, and whether diffusers' aMUSEd imports.
_PROBE = r"""
import importlib, json, sys
out = {}
try:
    kernels = importlib.import_module("kernels")  # Hugging Face's package, which the repo root must not hide
    out["kernels_file"] = getattr(kernels, "__file__", None)
    out["kernels_path"] = [str(p) for p in getattr(kernels, "__path__", [])]
except ImportError as e:
    out["kernels_error"] = f"{type(e).__name__}: {e}"
if "--diffusers" in sys.argv:
    try:
        from diffusers import AmusedPipeline  # noqa: F401
        import diffusers.utils, transformers.utils
        out["amused"] = "ok"
        out["diffusers_sees_kernels"] = bool(diffusers.utils.is_kernels_available())
        out["transformers_sees_kernels"] = bool(transformers.utils.is_kernels_available())
    except Exception as e:
        out["amused"] = f"{type(e).__name__}: {e}"
print("PROBE " + json.dumps(out))
"""


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


_HAS_DIFFUSERS = _has_distribution("diffusers")


def _probe(cwd: Path, *, diffusers: bool, python_args=(), env=None) -> dict:
    args = [sys.executable, *python_args, "-c", _PROBE] + (["--diffusers"] if diffusers else [])
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=_TIMEOUT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, f"probe failed in {cwd}:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("PROBE "):])


def _outside_repo(path: str | None) -> bool:
    return path is not None and ROOT not in Path(path).resolve().parents


def _env_without_kernels(farm: Path) -> dict:
    """Environment for ``python -S``: this interpreter's import path, each folder that holds
    Hugging Face's ``kernels`` replaced by a farm of symlinks to everything else in it."""
    entries = []
    for n, entry in enumerate(p for p in sys.path if p and Path(p).resolve() != ROOT and Path(p).is_dir()):
        src = Path(entry)
        if (src / "kernels" / "__init__.py").is_file():
            dst = farm / f"site{n}"
            dst.mkdir()
            for item in src.iterdir():
                name = item.name
                if name == "kernels" or (name.startswith("kernels-") and name.endswith(".dist-info")):
                    continue
                (dst / name).symlink_to(item)
            entries.append(str(dst))
        else:
            entries.append(entry)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(entries))
    env.pop("PYTHONHOME", None)
    return env


@pytest.fixture(scope="module")
def with_kernels(tmp_path_factory) -> dict:
    if not _has_distribution("kernels"):
        pytest.skip("Hugging Face's kernels is not installed (the case without it is tested below)")
    return {"root": _probe(ROOT, diffusers=_HAS_DIFFUSERS),
            "elsewhere": _probe(tmp_path_factory.mktemp("elsewhere"), diffusers=False)}


@pytest.fixture(scope="module")
def without_kernels(tmp_path_factory) -> dict:
    env = _env_without_kernels(tmp_path_factory.mktemp("site-without-kernels"))
    # -S: no site-packages of our own (its .pth files would bring `kernels` back); PYTHONPATH has them
    return {"root": _probe(ROOT, diffusers=_HAS_DIFFUSERS, python_args=("-S",), env=env),
            "elsewhere": _probe(tmp_path_factory.mktemp("elsewhere"), diffusers=False, python_args=("-S",), env=env)}


def test_import_kernels_from_root_is_hugging_faces(with_kernels):
    root, elsewhere = with_kernels["root"], with_kernels["elsewhere"]
    assert "kernels_error" not in root, root
    assert _outside_repo(root["kernels_file"]), f"`import kernels` in the repository root gave {root}"
    assert root["kernels_file"] == elsewhere["kernels_file"]


def test_diffusers_amused_imports_from_root(with_kernels):
    if not _HAS_DIFFUSERS:
        pytest.skip("diffusers is not installed (the peers extra)")
    root = with_kernels["root"]
    assert root["amused"] == "ok", root


def test_without_hugging_face_kernels_nothing_of_ours_is_taken_for_it(without_kernels):
    root, elsewhere = without_kernels["root"], without_kernels["elsewhere"]
    assert "kernels_error" in elsewhere, f"the probe still found Hugging Face's kernels: {elsewhere}"
    # From the root, Python may still see the folder as an empty namespace package (it cannot be
    # told otherwise while the folder exists), but never runs code of ours as `kernels`.
    if "kernels_error" not in root:
        assert root["kernels_file"] is None, root
        assert root["kernels_path"] == [str(ROOT / "kernels")], root


def test_without_hugging_face_kernels_diffusers_amused_imports_from_root(without_kernels):
    if not _HAS_DIFFUSERS:
        pytest.skip("diffusers is not installed (the peers extra)")
    root = without_kernels["root"]
    assert root["amused"] == "ok", root
    # transformers and diffusers must not take the folder for Hugging Face's kernels
    assert not root["transformers_sees_kernels"] and not root["diffusers_sees_kernels"], root


def test_musefast_kernels_in_a_source_install(tmp_path):
    """Editable install or source checkout: musefast.kernels is the repository's kernels/."""
    spec = importlib.util.find_spec("musefast")
    if spec is None or Path(spec.origin).resolve().parent != ROOT / "musefast":
        pytest.skip("musefast is not installed from this checkout")
    code = "import musefast.kernels.remask as m, musefast.kernels.vq, musefast.kernels.attention; print(m.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                          env=dict(os.environ, MUSEFAST_NO_EXT="1"), capture_output=True, text=True, timeout=_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve() == ROOT / "kernels" / "remask.py"


def test_wheel_holds_every_module_under_its_installed_name(tmp_path):
    """A regular (non-editable) install: every module of musefast/, kernels/ and csrc/ is in the
    wheel under musefast/, folders without __init__.py included; nothing installs as `kernels`."""
    src = tmp_path / "src"  # build from a copy: a build writes build/ and *.egg-info next to setup.py
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.so")
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("musefast", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=_TIMEOUT)
    if proc.returncode != 0 and "No matching distribution found for setuptools" in proc.stderr:
        pytest.skip("no package index reachable for the isolated build's setuptools")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("musefast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"musefast/{p.relative_to(src / 'musefast').as_posix()}" for p in (src / "musefast").rglob("*.py")}
    expected |= {f"musefast/kernels/{p.name}" for p in (src / "kernels").glob("*.py")}
    expected |= {f"musefast/csrc/{p.name}" for p in (src / "csrc").glob("*.py")}
    assert "musefast/kernels/remask.py" in expected
    assert sorted(expected - names) == []
    assert not any(n.startswith("kernels/") for n in names)
