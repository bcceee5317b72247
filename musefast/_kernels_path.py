"""Where ``musefast.kernels`` comes from in an editable install or a plain source checkout.

The Triton kernels live in the repository-root ``kernels/`` folder and install as
``musefast.kernels`` (setup.py ``package_dir``). That folder has no ``__init__.py`` on purpose:
as a regular package it would be importable as a top-level ``kernels`` from the repository root
and hide Hugging Face's ``kernels`` (which transformers 5 imports); as a namespace portion it
always loses to an installed ``kernels``.

A wheel install puts the files in ``site-packages/musefast/kernels/`` and Python finds them
there. setuptools' editable finder, however, cannot map a package without ``__init__.py``
(https://github.com/pypa/setuptools/issues/4248 and /4943), so ``pip install -e .`` alone leaves ``musefast.kernels``
unimportable. This finder, appended after every other one, answers only for
``musefast.kernels`` and only when nothing else did: then the package is the repository's
``kernels/`` folder next to this ``musefast/`` folder.
"""
from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

_NAME = "musefast.kernels"


class _SourceKernelsFinder:
    """Meta path finder: ``musefast.kernels`` -> ``<checkout>/kernels`` (a namespace package)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        spec = ModuleSpec(fullname, None, is_package=True)  # no loader: a namespace package
        spec.submodule_search_locations = [str(self.folder)]
        return spec


def install() -> None:
    """Register the finder when ``musefast/`` sits in a checkout with a ``kernels/`` beside it."""
    package = Path(__file__).resolve().parent
    if (package / "kernels").is_dir():
        return  # wheel install: the files are inside the package
    folder = package.parent / "kernels"
    if not (folder / "remask.py").is_file():
        return
    if not any(isinstance(f, _SourceKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceKernelsFinder(folder))
