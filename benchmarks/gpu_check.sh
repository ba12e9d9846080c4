#!/usr/bin/env bash
# One-GPU check: SFT, reward and ReMax (and ReMax on vLLM, where installed) a few steps each on a random 1.1B-parameter Llama (TinyLlama's
# shape, vocabulary 32000) in bf16 with Adam-mini at ZeRO-2, then tokens/s, step time and peak GPU
# memory per stage next to the memory plan of the same config. Nothing is downloaded.
#   bash benchmarks/gpu_check.sh [OUTPUT_ROOT] [key.sub=value ...]
# OUTPUT_ROOT (default runs/gpu_check) is replaced on each run; overrides go to every stage
# (e.g. optim.name=adamw, engine.micro_batch_size=4). STEPS: optimizer steps per stage (default 8).
# GPU_CHECK_SIZE=tiny shrinks the model and sequences to rehearse the whole check on a CPU.
# About 10 minutes on one A100-80GB, most of it writing the three 2.2 GB exports and ReMax's generation.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-runs/gpu_check}"
[ "$#" -gt 0 ] && shift
size="${GPU_CHECK_SIZE:-1b}"
steps="${STEPS:-8}"
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
export PYTHON="$python" NUM_GPUS=1
unset HOSTFILE
"$python" -c "from pipeline.versions import exit_on_incompatible_versions; exit_on_incompatible_versions()"
if [ "$size" != tiny ] && ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: no CUDA device visible to torch; this check needs one GPU (GPU_CHECK_SIZE=tiny rehearses it on CPU)" >&2
    exit 2
fi
if [ "$size" != tiny ]; then
    "$python" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'
fi
rm -rf "$root"
"$python" -m benchmarks.gpu_check prepare "$root" --size "$size" --steps "$steps"
start=$SECONDS
bash training_scripts/launch.sh stages.sft "$root/configs/sft.yaml" "$@"
bash training_scripts/launch.sh stages.reward "$root/configs/reward.yaml" "$@"
bash training_scripts/launch.sh stages.remax "$root/configs/remax.yaml" "$@"
# ReMax again with vLLM generating, where vLLM is installed (prepare wrote its config then).
if [ -f "$root/configs/remax_vllm.yaml" ]; then
    bash training_scripts/launch.sh stages.remax "$root/configs/remax_vllm.yaml" "$@"
fi
echo "stages finished in $((SECONDS - start)) s"
"$python" -m benchmarks.gpu_check report "$root" --json "$root/gpu_check.json" "$@"
