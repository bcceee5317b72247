"""Build script.

By default nothing is compiled here: ``musefast._C`` is built just-in-time on first use,
against the torch that is installed and running (see ``musefast/_build.py``). Set
``MUSEFAST_AOT=1`` (with ``--no-build-isolation`` so the build sees the installed torch) to
compile it ahead of time instead.
"""
import os

from setuptools import find_namespace_packages, setup

# kernels/ and csrc/ live at the repository root but install *inside* the musefast package:
# `kernels` is Hugging Face's top-level name (transformers imports it). kernels/ has no
# __init__.py so that Python started in the repository root never takes it for that package;
# musefast/_kernels_path.py maps it for editable installs, which setuptools cannot.
# Namespace discovery: a folder without __init__.py (kernels/, musefast/reference/) is a
# package too and must not be left out of a wheel.
packages = find_namespace_packages(
    include=["musefast", "musefast.*"], exclude=["musefast.assets", "musefast.assets.*", "*.__pycache__"]
) + ["musefast.kernels", "musefast.csrc"]
package_dir = {"musefast.kernels": "kernels", "musefast.csrc": "csrc"}
package_data = {
    "musefast.csrc": ["*.cpp", "*.h", "cuda/*.cu", "cuda/*.cpp", "cuda/*.h"],
    "musefast": ["assets/**/*"],  # the embedded demo model (musefast.load("demo"))
    "musefast.serve.static": ["*.html", "*.js", "*.css"],  # the web page of `musefast serve`
}

ext_modules, cmdclass = [], {}
if os.environ.get("MUSEFAST_AOT") == "1":
    # Load the build module by path: importing the musefast package would need its deps.
    import importlib.util

    spec = importlib.util.spec_from_file_location("musefast_build", "musefast/_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ext_modules, cmdclass = build.aot_extension()

setup(
    packages=packages,
    package_dir=package_dir,
    package_data=package_data,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
