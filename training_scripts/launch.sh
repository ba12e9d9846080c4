#!/usr/bin/env bash
# Shared launcher for the stage scripts:
#   bash training_scripts/launch.sh MODULE CONFIG [key.sub=value ...]
# NUM_GPUS: ranks on this machine (default 1); HOSTFILE: a DeepSpeed hostfile for several
# machines (then NUM_GPUS is ignored); MASTER_PORT: the rendezvous port (default: a free one, so
# jobs sharing a machine do not meet on DeepSpeed's fixed 29500). Without CUDA, DeepSpeed runs on the CPU.
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 MODULE CONFIG [key.sub=value ...]" >&2
    exit 2
fi
module="$1"
config="$2"
shift 2
num_gpus="${NUM_GPUS:-1}"
# Checked before any use: bash evaluates text inside $(( )) as code, command substitutions included.
if [ -z "${HOSTFILE:-}" ] && ! [[ "$num_gpus" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NUM_GPUS is '$num_gpus'; give a positive integer" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then python="$PYTHON"
elif [ -x .venv/bin/python ]; then python=.venv/bin/python
else python=python3
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    export DS_ACCELERATOR=cpu
    # Ranks share the cores: more threads than cores makes every rank wait on the others.
    if [ -z "${OMP_NUM_THREADS:-}" ] && [ -z "${HOSTFILE:-}" ]; then
        threads=$(( $(nproc) / num_gpus ))
        export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
    fi
fi
if [ -n "${MASTER_PORT:-}" ]; then
    master_port="$MASTER_PORT"
    if ! [[ "$master_port" =~ ^[1-9][0-9]*$ ]] || [ "${#master_port}" -gt 5 ] || [ "$master_port" -gt 65535 ]; then
        echo "error: MASTER_PORT is '$master_port'; give a port number (1-65535) or leave it unset for a free one" >&2
        exit 2
    fi
else
    # A free port below the ephemeral range (pipeline/ports.py says why; with HOSTFILE, run this on the first host).
    master_port=$("$python" -m pipeline.ports)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The launcher's own lines (commands, world info, "no hostfile") only with DS_LOG_LEVEL=info or warning.
launcher=("$python" -m deepspeed.launcher.runner --log_level "${DS_LOG_LEVEL:-error}" --master_port "$master_port")
if [ -n "${HOSTFILE:-}" ]; then
    launcher+=(--hostfile "$HOSTFILE")
else
    launcher+=(--num_gpus "$num_gpus")
fi
exec "${launcher[@]}" --module "$module" --config "$config" "$@"
