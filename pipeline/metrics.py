"""What a run reports while it trains: one logger (JSONL + TensorBoard), throughput, peak memory, a progress bar.

Everything here is rank-aware the same way: rank 0 does the work, other ranks get objects
whose methods do nothing, so a stage calls them unconditionally.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Appends `{"step": N, name: value, ...}` to `output_dir/metrics.jsonl` and the same
    scalars to TensorBoard (`output_dir/tensorboard`). Rank 0 only; elsewhere a no-op.

    Without `resume_step` the run starts a fresh `metrics.jsonl`. With it, lines after
    `resume_step` (written by the interrupted run past its last checkpoint) are dropped and
    TensorBoard is told to hide events from step `resume_step + 1` on, so a resumed run's
    metrics equal an uninterrupted run's.
    """

    def __init__(self, output_dir, *, rank: int, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.enabled = rank == 0
        self._file = None
        self._writer = None
        if not self.enabled:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / METRICS_FILE
        if resume_step is not None:
            _truncate_after(path, resume_step)
        self._file = open(path, "a" if resume_step is not None else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: readers discard earlier-written events at or after this step.
            purge_step = 0 if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(log_dir=str(output_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def log(self, metrics: dict, step: int) -> None:
        """Writes one line (flushed at once) and one TensorBoard scalar per metric.

        Raises:
            ValueError: a metric is named "step".
            TypeError: a value is not a number or a one-element tensor / numpy scalar.
        """
        if not self.enabled:
            return
        record = {"step": int(step)}
        for name, value in metrics.items():
            if name == "step":
                raise ValueError('a metric may not be named "step"; the step is passed as `step`')
            record[name] = _as_number(name, value)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if name != "step":
                    self._writer.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _as_number(name: str, value):
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        raise TypeError(f"metric {name!r} is a tensor of {value.numel()} elements; log one number (e.g. its mean)")
    if hasattr(value, "item"):  # torch tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric {name!r} is {value!r} ({type(value).__name__}); log ints, floats or "
                        "one-element tensors")
    return value


def _truncate_after(path: Path, last_step: int) -> None:
    """Keeps the lines of `path` with step <= `last_step`; replaces the file atomically so a
    crash here leaves either the old file or the new one."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off when the previous run was killed
        if record.get("step", last_step + 1) <= last_step:
            kept.append(line + "\n")
    handle, temp_path = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
            temp_file.writelines(kept)
        os.replace(temp_path, path)
    except BaseException:
        Path(temp_path).unlink(missing_ok=True)
        raise


def peak_memory_bytes() -> int:
    """The CUDA allocator's peak on the current device when CUDA is available, else this
    process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB, macOS bytes


class ThroughputMeter:
    """Times one step: `start()`, then `stop(tokens)` -> {"step_time": s, "tokens_per_s": ...}.

    `clock` returns seconds (injectable for tests). When CUDA is in use both ends wait for
    queued kernels, or the time would measure only their launch.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._started_at: Optional[float] = None

    def start(self) -> None:
        synchronize_cuda()
        self._started_at = self.clock()

    def stop(self, tokens: int) -> dict:
        """Raises:
            RuntimeError: `start()` was not called since the last `stop()`.
        """
        if self._started_at is None:
            raise RuntimeError("ThroughputMeter.stop() called without start()")
        synchronize_cuda()
        step_time = self.clock() - self._started_at
        self._started_at = None
        # A clock that did not advance gives no rate rather than a division error mid-run.
        return {"step_time": step_time, "tokens_per_s": tokens / step_time if step_time > 0 else 0.0}


def synchronize_cuda() -> None:
    """Waits for queued CUDA kernels, so a wall-clock time covers their work, not just their launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _NoProgress:
    """Stands in for a tqdm bar on other ranks or when the bar is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, rank: int, enabled: bool, initial: int = 0):
    """A tqdm bar on rank 0 when `enabled`, else an object with the same `update(n)`,
    `set_postfix(**kw)` and `close()` that does nothing. `initial`: steps already done
    (a resumed run)."""
    if rank != 0 or not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step")
