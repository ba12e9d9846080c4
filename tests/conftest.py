import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

# Tokenised data (pipeline.data_cache) and datasets' own files go to a folder of this test session,
# never the user's cache; ranks started by the tests inherit it.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mini-rlhf-tests-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

# Tiny models: a second thread buys nothing and, on a loaded 2-core machine, costs each small op
# milliseconds of thread hand-off (a 1-layer forward measured 4 ms alone, 90 ms next to another job).
# Ranks started by the tests run with OMP_NUM_THREADS=1 likewise (rank_env).
torch.set_num_threads(1)

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


def rank_command(args: list, local_rank: int) -> list:
    """The command the DeepSpeed launcher runs for one rank: `python -u SCRIPT --local_rank=R ARGS`, or
    `python -u -m MODULE --local_rank=R ARGS` for `["--module", MODULE, *ARGS]`."""
    args = [str(arg) for arg in args]
    target, rest = (["-m", args[1]], args[2:]) if args[0] == "--module" else ([args[0]], args[1:])
    return [sys.executable, "-u", *target, f"--local_rank={local_rank}", *rest]


def start_ranks(world_size: int, args: list, stdout=None, stderr=None) -> list:
    """Starts `world_size` ranks on this machine as `deepspeed --num_gpus N` does (the same command
    and rendezvous variables per rank), without the launcher's two interpreters (~6 s a launch).
    The ranks share one process group, led by rank 0's, so one killpg stops them all."""
    port = free_port()
    processes = []
    for rank in range(world_size):
        env = rank_env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size),
                   CROSS_RANK="0", CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        group = {"process_group": 0 if rank == 0 else processes[0].pid}
        processes.append(subprocess.Popen(rank_command(args, rank), cwd=REPO_ROOT, env=env, stdout=stdout,
                                          stderr=stderr, stdin=subprocess.DEVNULL, **group))
    processes[0].port = port
    return processes


def stop_ranks(processes: list) -> None:
    """SIGKILLs every rank (and anything they started) and reaps them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(processes[0].pid, signal.SIGKILL)
    for process in processes:
        process.wait()
    sweep_shared_memory([processes[0].port])


def launch_ranks(world_size: int, args: list, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs `world_size` real DeepSpeed ranks on CPU to completion (see `start_ranks`); fails the test,
    with the end of their output, when a rank exits non-zero (the others are stopped at once) or the
    ranks outlast `timeout`."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        processes = start_ranks(world_size, args, stdout=stdout, stderr=stderr)
        deadline, failed = time.monotonic() + timeout, None
        try:
            while any(process.poll() is None for process in processes):
                failed = next((p for p in processes if p.poll() not in (None, 0)), None)
                if failed is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            timed_out = any(process.poll() is None for process in processes) and failed is None
            stop_ranks(processes)
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    codes = [process.returncode for process in processes]
    tail = (out + err)[-6000:]
    if timed_out:
        pytest.fail(f"{world_size}-rank launch timed out after {timeout} s:\n{tail}")
    if failed is not None or any(codes):
        code = failed.returncode if failed is not None else next(c for c in codes if c)
        pytest.fail(f"{world_size}-rank launch failed (exit {code}):\n{tail}")
    return subprocess.CompletedProcess(rank_command(args, 0), 0, out, err)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# Metrics that measure the machine, not the run: they differ between otherwise identical runs.
TIMING_METRICS = ("tokens_per_s", "step_time", "optimizer_step_time", "peak_memory_bytes")


def without_timing(rows: list) -> list:
    """metrics.jsonl rows without TIMING_METRICS, for comparing two runs row for row."""
    return [{name: value for name, value in row.items() if name not in TIMING_METRICS} for row in rows]
