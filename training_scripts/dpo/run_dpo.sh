#!/usr/bin/env bash
# DPO on preference pairs, against a frozen reference policy.
#   NUM_GPUS=2 bash training_scripts/dpo/run_dpo.sh [CONFIG] [key.sub=value ...]
# CONFIG defaults to configs/tiny/dpo.yaml; overrides are passed through unchanged.
set -euo pipefail
config="${1:-configs/tiny/dpo.yaml}"
[ "$#" -gt 0 ] && shift
exec bash "$(dirname "$0")/../launch.sh" stages.dpo "$config" "$@"
