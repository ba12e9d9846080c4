#!/usr/bin/env bash
# Policy optimisation side by side on the comparison task: SFT and a reward model once, then every
# algorithm from that same SFT policy (and reward model where it uses one), on NUM_GPUS ranks
# (default 2) with Adam-mini. Writes to OUTPUT_ROOT/report: overlaid curves of held-out greedy gold
# reward, reward-model score and KL against step and against training time (each algorithm's seeds as
# their mean with a min-max band), summary.md (mean ± std over the seeds, reward-hacking signals) and
# algorithms.md, a table of the final policies' held-out scores and of what the runs cost, mean ± std
# over the seeds, with which differences exceed the seeds' spread.
#   bash training_scripts/compare_algorithms.sh [--seeds N] [OUTPUT_ROOT] [key.sub=value ...]
# --seeds: runs of each algorithm, seeds 0..N-1 (default 3), all from the same SFT policy and reward model.
# OUTPUT_ROOT defaults to runs/algorithms and is replaced; overrides go to every stage.
# ALGORITHMS="remax rloo grpo dpo" picks the algorithms (default: every one with a config file).
# TASK picks the task: compare (default; data/compare, configs/compare: a gold reward with headroom and a
# reward model that can be over-optimised, see pipeline/compare_task.py) or demo (the quick start's
# data/demo, configs/tiny, where every algorithm plateaus at the same gold reward).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=3
if [ "${1:-}" = --seeds ]; then
    seeds="${2:?--seeds needs a number}"
    shift 2
fi
if ! [[ "$seeds" =~ ^[1-9][0-9]*$ ]]; then
    echo "compare_algorithms.sh: --seeds is '$seeds'; give a positive whole number" >&2
    exit 2
fi
case "${TASK:-compare}" in
    compare) configs=configs/compare ;;
    demo) configs=configs/tiny ;;
    *) echo "compare_algorithms.sh: TASK is '$TASK'; use compare or demo" >&2
       exit 2 ;;
esac
root="${1:-runs/algorithms}"
[ "$#" -gt 0 ] && shift
export NUM_GPUS="${NUM_GPUS:-2}"
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
read -ra algorithms <<< "${ALGORITHMS:-remax rloo grpo ppo dpo}"
start=$SECONDS
sft="$root/sft/final"
reward="$root/reward/final"
bash training_scripts/sft/run_sft_full.sh "$configs/sft_full.yaml" "output_dir=$root/sft" \
    checkpoint.overwrite=true "$@"
bash training_scripts/reward/run_reward.sh "$configs/reward.yaml" "output_dir=$root/reward" \
    "model.path=$sft" checkpoint.overwrite=true "$@"
runs=()
for algorithm in "${algorithms[@]}"; do
    config="$configs/$algorithm.yaml"
    if [ ! -f "$config" ]; then
        echo "skipping $algorithm: no $config" >&2
        continue
    fi
    case "$algorithm" in
        dpo) script=training_scripts/dpo/run_dpo.sh; models=() ;;  # the pairs alone: no reward model
        *) script="training_scripts/po/$algorithm/run_$algorithm.sh"
           models=("$algorithm.reward_model_path=$reward") ;;
    esac
    for seed in $(seq 0 $((seeds - 1))); do
        run="$root/$algorithm-seed$seed"
        algorithm_start=$SECONDS
        bash "$script" "$config" "output_dir=$run" "model.path=$sft" "${models[@]}" "seed=$seed" \
            checkpoint.overwrite=true "$@"
        echo "$algorithm seed $seed trained in $((SECONDS - algorithm_start)) s"
        # Every final policy scored the same way: greedy and sampled gold reward, win rate and KL against SFT.
        "$python" -m pipeline.evaluate policy --config "$configs/eval_policy.yaml" "policy_path=$run/final" \
            "reward_model_path=$reward" "baseline_policy_path=$sft" "ref_model_path=$sft" \
            "output=$run/eval_policy.json" > /dev/null
        runs+=("$run")
    done
done
"$python" -m pipeline.evaluate curves "${runs[@]}" --out "$root/report" > /dev/null
"$python" -m pipeline.evaluate algorithms "${runs[@]}" --out "$root/report/algorithms.md"
echo "compared ${#runs[@]} runs ($seeds seed(s) per algorithm) in $((SECONDS - start)) s; curves and algorithms.md in $root/report"
