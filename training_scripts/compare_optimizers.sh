#!/usr/bin/env bash
# The demo pipeline with AdamW and with Adam-mini, same data and seeds, then one figure per
# metric with both optimizers on it (OUTPUT_ROOT/report/<stage>/).
#   bash training_scripts/compare_optimizers.sh [OUTPUT_ROOT] [key.sub=value ...]
# SEEDS="0 1 2" runs several seeds (default "0"); NUM_GPUS sets the ranks (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-runs/compare}"
[ "$#" -gt 0 ] && shift
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
read -ra seeds <<< "${SEEDS:-0}"  # split on spaces only: an unquoted ${SEEDS} would also glob
runs=()
for seed in "${seeds[@]}"; do
    for optimizer in adamw adam_mini; do
        run="$root/$optimizer-seed$seed"
        bash training_scripts/demo.sh "$run" "optim.name=$optimizer" "seed=$seed" "$@"
        runs+=("$run")
    done
done
for stage in sft reward remax; do
    stage_runs=()
    for run in "${runs[@]}"; do stage_runs+=("$run/$stage"); done
    "$python" -m pipeline.evaluate curves "${stage_runs[@]}" --out "$root/report/$stage"
done
