#!/usr/bin/env bash
# CI: build the documentation site with mkdocs-material, strictly (a broken link, a missing
# anchor or a page left out of nav fails), into a temporary folder. Nothing is published.
# Installs mkdocs-material into the active virtual environment.
set -euo pipefail
export NO_MKDOCS_2_WARNING=1  # the theme's end-of-life banner says nothing about this build
cd "$(dirname "$0")/.."
python -m pip install -q mkdocs-material
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
python -m mkdocs build --strict --site-dir "$site"
echo "docs: built $(find "$site" -name '*.html' | wc -l) HTML pages (strict)"
