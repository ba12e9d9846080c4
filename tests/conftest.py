import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tokenised data (pipeline.data_cache) and datasets' own files go to a folder of this test session,
# never the user's cache; ranks started by the tests inherit it.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mini-rlhf-tests-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


from pipeline.ports import free_port as pipeline_free_port, shared_memory_names  # noqa: E402

LAUNCH_PORTS = set()  # every master port handed out, so the ranks' /dev/shm files can be swept


def free_port() -> int:
    port = pipeline_free_port()
    LAUNCH_PORTS.add(port)
    return port


def sweep_shared_memory(ports) -> None:
    """Removes DeepSpeed's CPU all-reduce buffers (66 MiB of RAM each) left by ranks meeting on `ports`:
    workers that call deepspeed.initialize directly never unlink theirs (the stages do, pipeline.engine)."""
    for port in ports:
        for name in shared_memory_names(port):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


atexit.register(lambda: sweep_shared_memory(LAUNCH_PORTS))


# Set in this process by any test that ran a stage in a world of one (pipeline.engine.init_distributed);
# a launch that inherited them would meet on this process's own store port (EADDRINUSE).
RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rank_env() -> dict:
    env = {name: value for name, value in os.environ.items() if name not in RENDEZVOUS_VARIABLES}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def launch_ranks(world_size: int, args: list, timeout: int = 900) -> subprocess.CompletedProcess:
    """Starts `world_size` real DeepSpeed ranks on CPU with the deepspeed launcher."""
    port = free_port()
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size),
               "--master_port", str(port), *map(str, args)]
    # A session of its own: on a timeout the ranks go too, not only the launcher (the ranks would
    # otherwise hold the output pipes open and the test would wait for ever).
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=rank_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{world_size}-rank launch timed out after {timeout} s:\n{(stdout + stderr)[-6000:]}")
    finally:
        sweep_shared_memory([port])
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-6000:]
        pytest.fail(f"{world_size}-rank launch failed (exit {result.returncode}):\n{tail}")
    return result


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# Metrics that measure the machine, not the run: they differ between otherwise identical runs.
TIMING_METRICS = ("tokens_per_s", "step_time", "optimizer_step_time", "peak_memory_bytes")


def without_timing(rows: list) -> list:
    """metrics.jsonl rows without TIMING_METRICS, for comparing two runs row for row."""
    return [{name: value for name, value in row.items() if name not in TIMING_METRICS} for row in rows]
