#!/usr/bin/env bash
# RLOO policy optimisation (k samples per prompt, no critic).
#   NUM_GPUS=2 bash training_scripts/po/rloo/run_rloo.sh [CONFIG] [key.sub=value ...]
# CONFIG defaults to configs/tiny/rloo.yaml; overrides are passed through unchanged.
set -euo pipefail
config="${1:-configs/tiny/rloo.yaml}"
[ "$#" -gt 0 ] && shift
exec bash "$(dirname "$0")/../../launch.sh" stages.rloo "$config" "$@"
