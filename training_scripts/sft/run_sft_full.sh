#!/usr/bin/env bash
# Full-parameter SFT.
#   NUM_GPUS=2 bash training_scripts/sft/run_sft_full.sh [CONFIG] [key.sub=value ...]
# CONFIG defaults to configs/tiny/sft_full.yaml; overrides are passed through unchanged.
set -euo pipefail
config="${1:-configs/tiny/sft_full.yaml}"
[ "$#" -gt 0 ] && shift
exec bash "$(dirname "$0")/../launch.sh" stages.sft "$config" "$@"
