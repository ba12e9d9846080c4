#!/usr/bin/env bash
# ReMax policy optimisation.
#   NUM_GPUS=2 bash training_scripts/po/remax/run_remax.sh [CONFIG] [key.sub=value ...]
# CONFIG defaults to configs/tiny/remax.yaml; overrides are passed through unchanged.
set -euo pipefail
config="${1:-configs/tiny/remax.yaml}"
[ "$#" -gt 0 ] && shift
exec bash "$(dirname "$0")/../../launch.sh" stages.remax "$config" "$@"
