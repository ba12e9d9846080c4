#!/usr/bin/env bash
# The demo pipeline (SFT, reward model, ReMax) with AdamW and with Adam-mini, same data and seeds,
# then one figure per metric with both optimizers on it, each optimizer's seeds as their mean with a
# min-max band, and summary.md with mean ± std over the seeds (OUTPUT_ROOT/report/<stage>/).
#   bash training_scripts/compare_optimizers.sh [--seeds N] [OUTPUT_ROOT] [key.sub=value ...]
# --seeds: whole pipelines per optimizer, seeds 0..N-1 (default 3). NUM_GPUS sets the ranks (default 2).
# TASK picks the task: compare (default; data/compare, configs/compare, a gold reward with headroom, see
# pipeline/compare_task.py) or demo (the quick start's data/demo and configs/tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
count=3
if [ "${1:-}" = --seeds ]; then
    count="${2:?--seeds needs a number}"
    shift 2
fi
if ! [[ "$count" =~ ^[1-9][0-9]*$ ]]; then
    echo "compare_optimizers.sh: --seeds is '$count'; give a positive whole number" >&2
    exit 2
fi
case "${TASK:-compare}" in
    compare) configs=configs/compare ;;
    demo) configs=configs/tiny ;;
    *) echo "compare_optimizers.sh: TASK is '$TASK'; use compare or demo" >&2
       exit 2 ;;
esac
root="${1:-runs/compare}"
[ "$#" -gt 0 ] && shift
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
read -ra seeds <<< "$(seq -s ' ' 0 $((count - 1)))"
runs=()
for seed in "${seeds[@]}"; do
    for optimizer in adamw adam_mini; do
        run="$root/$optimizer-seed$seed"
        CONFIGS="$configs" bash training_scripts/demo.sh "$run" "optim.name=$optimizer" "seed=$seed" "$@"
        runs+=("$run")
    done
done
for stage in sft reward remax; do
    stage_runs=()
    for run in "${runs[@]}"; do stage_runs+=("$run/$stage"); done
    "$python" -m pipeline.evaluate curves "${stage_runs[@]}" --out "$root/report/$stage"
done
