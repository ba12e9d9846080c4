#!/usr/bin/env bash
# PPO policy optimisation (a critic with its own engine, GAE, clipped policy and value losses).
#   NUM_GPUS=2 bash training_scripts/po/ppo/run_ppo.sh [CONFIG] [key.sub=value ...]
# CONFIG defaults to configs/tiny/ppo.yaml; overrides are passed through unchanged.
set -euo pipefail
config="${1:-configs/tiny/ppo.yaml}"
[ "$#" -gt 0 ] && shift
exec bash "$(dirname "$0")/../../launch.sh" stages.ppo "$config" "$@"
