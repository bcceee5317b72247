#!/usr/bin/env bash
# CI step: the image server. Installs the serve extra (FastAPI, uvicorn, prometheus_client,
# python-multipart) and the test clients (openai, httpx) into the active environment, then runs
# the server tests against real servers on 127.0.0.1 (the demo model, offline). Without the
# serve extra these tests skip, so the main test stage alone would not exercise the server.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q -e ".[serve]" openai httpx
python -c "import fastapi, uvicorn, prometheus_client, multipart, openai, httpx; \
print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'openai', openai.__version__)"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "== server tests (openai SDK, raw HTTP, concurrency, disconnect, SIGTERM drain)"
python -m pytest -q -p no:cacheprovider tests/test_server_*.py
