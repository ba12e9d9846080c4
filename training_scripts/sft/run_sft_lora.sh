#!/usr/bin/env bash
# LoRA SFT.
#   NUM_GPUS=2 bash training_scripts/sft/run_sft_lora.sh [CONFIG] [key.sub=value ...]
# CONFIG defaults to configs/tiny/sft_lora.yaml; overrides are passed through unchanged.
set -euo pipefail
config="${1:-configs/tiny/sft_lora.yaml}"
[ "$#" -gt 0 ] && shift
exec bash "$(dirname "$0")/../launch.sh" stages.sft "$config" "$@"
