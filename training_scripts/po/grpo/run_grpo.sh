#!/usr/bin/env bash
# GRPO policy optimisation (k samples per prompt, no critic).
#   NUM_GPUS=2 bash training_scripts/po/grpo/run_grpo.sh [CONFIG] [key.sub=value ...]
# CONFIG defaults to configs/tiny/grpo.yaml; overrides are passed through unchanged.
set -euo pipefail
config="${1:-configs/tiny/grpo.yaml}"
[ "$#" -gt 0 ] && shift
exec bash "$(dirname "$0")/../../launch.sh" stages.grpo "$config" "$@"
