#!/usr/bin/env bash
# Refreshes the lock: the exact versions scripts/setup.sh installs and the suite passes on.
#   bash scripts/lock.sh            # newest releases inside pyproject.toml's ranges, torch as requirements/torch.txt
# Writes requirements/cuda.txt (uv pip compile of pyproject.toml with the `test` extra, for Linux x86_64 and
# Python 3.11: PyPI's torch with its CUDA wheels) and requirements/cpu.txt (the same versions with the +cpu
# torch and without the packages only the CUDA build pulls). Run the whole suite on the new lock
# (`bash scripts/setup.sh && .venv/bin/python -m pytest -q tests`) before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v uv >/dev/null 2>&1; then
    uv=(uv)
elif .venv/bin/python -m uv --version >/dev/null 2>&1; then
    uv=(.venv/bin/python -m uv)
else
    echo "scripts/lock.sh needs uv: pip install uv" >&2
    exit 2
fi
"${uv[@]}" pip compile pyproject.toml --extra test --constraint requirements/torch.txt \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet -o requirements/cuda.txt
python3 - <<'PY'
"""requirements/cpu.txt from requirements/cuda.txt: torch's +cpu build, no CUDA-only packages."""
import re
from pathlib import Path

CUDA_ONLY = re.compile(r"^(nvidia-[\w.-]+|triton|cuda-[\w.-]+)==")
header = ("# The CPU set: requirements/cuda.txt with torch's +cpu build and without the packages only\n"
          "# the CUDA build pulls. Written by scripts/lock.sh; do not edit.\n")
lines, skipping = [], False
for line in Path("requirements/cuda.txt").read_text().splitlines():
    if not line.startswith(" "):  # a package line; its `# via` lines follow, indented
        skipping = bool(CUDA_ONLY.match(line))
        line = re.sub(r"^torch==([\w.]+)$", r"torch==\1+cpu", line)
    if not skipping:
        lines.append(line)
Path("requirements/cpu.txt").write_text(header + "\n".join(lines) + "\n")
PY
cuda_header="# The CUDA set: uv pip compile pyproject.toml --extra test --constraint requirements/torch.txt
# (Linux x86_64, Python 3.11). Written by scripts/lock.sh; do not edit."
printf '%s\n%s' "$cuda_header" "$(cat requirements/cuda.txt)" > requirements/cuda.txt
echo "lock: requirements/cuda.txt ($(grep -c '^[a-z]' requirements/cuda.txt) packages), requirements/cpu.txt ($(grep -c '^[a-z]' requirements/cpu.txt))"
