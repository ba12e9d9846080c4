#!/usr/bin/env bash
# Reward-model training.
#   NUM_GPUS=2 bash training_scripts/reward/run_reward.sh [CONFIG] [key.sub=value ...]
# CONFIG defaults to configs/tiny/reward.yaml; overrides are passed through unchanged.
set -euo pipefail
config="${1:-configs/tiny/reward.yaml}"
[ "$#" -gt 0 ] && shift
exec bash "$(dirname "$0")/../launch.sh" stages.reward "$config" "$@"
