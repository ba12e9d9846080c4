#!/usr/bin/env bash
# The CPU demo: SFT -> reward model -> ReMax with Adam-mini on 2 DeepSpeed ranks, on the shipped
# demo task (data/demo; regenerate with scripts/make_demo_data.py), then reward curves, a summary and
# the ReMax policy scored against the SFT one on held-out prompts.
#   bash training_scripts/demo.sh [OUTPUT_ROOT] [key.sub=value ...]
# OUTPUT_ROOT defaults to runs/demo and is replaced on each run; overrides go to every stage
# (e.g. optim.name=adamw). NUM_GPUS sets the number of ranks (default 2); CONFIGS the directory of
# the stage configs (default configs/tiny; configs/compare runs the comparison task).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-runs/demo}"
[ "$#" -gt 0 ] && shift
export NUM_GPUS="${NUM_GPUS:-2}"
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
configs="${CONFIGS:-configs/tiny}"
start=$SECONDS
bash training_scripts/sft/run_sft_full.sh "$configs/sft_full.yaml" "output_dir=$root/sft" \
    checkpoint.overwrite=true "$@"
bash training_scripts/reward/run_reward.sh "$configs/reward.yaml" "output_dir=$root/reward" \
    "model.path=$root/sft/final" checkpoint.overwrite=true "$@"
bash training_scripts/po/remax/run_remax.sh "$configs/remax.yaml" "output_dir=$root/remax" \
    "model.path=$root/sft/final" "remax.reward_model_path=$root/reward/final" checkpoint.overwrite=true "$@"
"$python" -m pipeline.evaluate curves "$root/sft" "$root/reward" "$root/remax" --out "$root/report"
"$python" -m pipeline.evaluate policy --config "$configs/eval_policy.yaml" "policy_path=$root/remax/final" \
    "reward_model_path=$root/reward/final" "baseline_policy_path=$root/sft/final" "ref_model_path=$root/sft/final" \
    "output=$root/report/eval_policy.json"
echo "demo finished in $((SECONDS - start)) s; reward curves: $root/report/eval_reward.png, eval_gold_reward.png"
