#!/usr/bin/env bash
# The CPU demo: Adam-mini inside DeepSpeed ZeRO-2 on 2 CPU ranks.
#   bash training_scripts/demo.sh [extra arguments for examples/deepspeed_zero.py]
# NUM_RANKS sets the number of ranks (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m deepspeed.launcher.runner --num_gpus "${NUM_RANKS:-2}" examples/deepspeed_zero.py "$@"
