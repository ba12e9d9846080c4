#!/usr/bin/env bash
# Creates .venv and installs the project with its test dependencies: a CUDA torch where an NVIDIA GPU
# answers `nvidia-smi`, the CPU torch elsewhere.
#   bash scripts/setup.sh
# TORCH_INDEX_URL: another torch build, e.g. https://download.pytorch.org/whl/cu126 for a driver older
# than PyPI's default CUDA wheel needs. PYTHON: the interpreter that creates .venv (default python3).
# torch is pinned and installed first: PyPI's Linux torch carries several GB of CUDA wheels, so a CPU
# machine asks for the +cpu build. Every other bound is pyproject.toml's (the same as environment.yml's;
# tests/test_dependencies.py holds them equal). DeepSpeed ships as an sdist and is built without
# isolation against the torch installed here; its ops are compiled on first use (DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="2.13.0"  # the version the tests run on, within pyproject.toml's torch bound
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q)
"${pip[@]}" --upgrade pip setuptools wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the CUDA build of torch $TORCH_VERSION"
    "${pip[@]}" "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
elif [ "$(uname -s)" = Linux ]; then
    echo "No NVIDIA GPU: installing the CPU build of torch $TORCH_VERSION"
    "${pip[@]}" "torch==$TORCH_VERSION+cpu" --extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
else
    "${pip[@]}" "torch==$TORCH_VERSION"  # macOS wheels carry no CUDA
fi
DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation -e ".[test]"
.venv/bin/python -c "from pipeline.versions import exit_on_incompatible_versions; exit_on_incompatible_versions()"
