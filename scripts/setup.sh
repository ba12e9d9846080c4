#!/usr/bin/env bash
# Creates .venv and installs the project with its test dependencies (CPU).
# torch is pinned and installed first: an unpinned torch, asked for by any later package,
# would pull several GB of CUDA wheels. DeepSpeed ships as an sdist whose build imports
# torch, so it is built without isolation against the torch already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q "torch==2.13.0"
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation -e ".[test]"
