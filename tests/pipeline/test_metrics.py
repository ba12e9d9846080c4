"""The metrics logger (JSONL + TensorBoard, read back), resume truncation, throughput, peak memory, progress bar."""
import json
import os
import time

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.metrics import MetricsLogger, ThroughputMeter, peak_memory_bytes, progress_bar


def read_lines(output_dir) -> list:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(output_dir, tag: str) -> list:
    accumulator = EventAccumulator(str(output_dir / "tensorboard"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def next_second() -> None:
    """Event files are read in name order and the name starts with the creation second; a second
    writer made within the same second could sort first (its counter goes 9 -> 10), so wait."""
    started = int(time.time())
    while int(time.time()) == started:
        time.sleep(0.02)


def log_steps(output_dir, losses: dict, **kwargs) -> None:
    with MetricsLogger(output_dir, rank=0, **kwargs) as logger:
        for step, loss in losses.items():
            logger.log({"loss": loss}, step=step)


# ---- MetricsLogger ------------------------------------------------------------------------------

def test_each_call_is_one_flushed_line_with_step_first(tmp_path):
    logger = MetricsLogger(tmp_path, rank=0, tensorboard=False)
    logger.log({"loss": torch.tensor(2.5), "lr": 1e-3, "tokens": np.int64(7)}, step=1)
    logger.log({"loss": 1.25}, step=2)
    lines = read_lines(tmp_path)  # before close(): each line is flushed as it is logged
    logger.close()
    assert lines == [{"step": 1, "loss": 2.5, "lr": 1e-3, "tokens": 7}, {"step": 2, "loss": 1.25}]
    assert [list(line) for line in lines] == [["step", "loss", "lr", "tokens"], ["step", "loss"]]
    assert not (tmp_path / "tensorboard").exists()


def test_other_ranks_write_nothing(tmp_path):
    with MetricsLogger(tmp_path / "run", rank=1) as logger:
        logger.log({"loss": 1.0}, step=1)
    assert not (tmp_path / "run").exists()


def test_tensorboard_holds_the_scalars(tmp_path):
    log_steps(tmp_path, {1: 3.0, 2: 2.5, 3: 0.75})
    assert tensorboard_scalars(tmp_path, "loss") == [(1, 3.0), (2, 2.5), (3, 0.75)]


def test_resume_keeps_exactly_the_steps_up_to_the_checkpoint(tmp_path):
    log_steps(tmp_path, {1: 5.0, 2: 4.0, 3: 3.0, 4: 2.0, 5: 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # the interrupted run was killed mid-line
    next_second()
    logger = MetricsLogger(tmp_path, rank=0, resume_step=3)
    assert read_lines(tmp_path) == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.0}]
    logger.log({"loss": 2.5}, step=4)
    logger.log({"loss": 1.5}, step=5)
    logger.close()

    expected = [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.5), (5, 1.5)]  # what an uninterrupted run logs
    assert [(line["step"], line["loss"]) for line in read_lines(tmp_path)] == expected
    assert tensorboard_scalars(tmp_path, "loss") == expected  # the first run's steps 4-5 are purged
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_a_fresh_run_starts_a_new_file(tmp_path):
    log_steps(tmp_path, {1: 5.0, 2: 4.0})
    next_second()
    log_steps(tmp_path, {1: 9.0})
    assert read_lines(tmp_path) == [{"step": 1, "loss": 9.0}]
    assert tensorboard_scalars(tmp_path, "loss") == [(1, 9.0)]


@pytest.mark.parametrize("metrics, error, message", [
    ({"stage": "sft"}, TypeError, "metric 'stage' is 'sft'"),
    ({"loss": torch.ones(2)}, TypeError, "metric 'loss' is a tensor of 2 elements"),
    ({"step": 3}, ValueError, 'may not be named "step"'),
])
def test_log_rejects_what_is_not_a_named_number(tmp_path, metrics, error, message):
    with MetricsLogger(tmp_path, rank=0, tensorboard=False) as logger:
        with pytest.raises(error, match=message):
            logger.log(metrics, step=1)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


# ---- throughput, memory, progress ---------------------------------------------------------------

def test_throughput_from_an_injected_clock():
    meter = ThroughputMeter(clock=iter([10.0, 10.5, 20.0, 24.0]).__next__)
    meter.start()
    assert meter.stop(tokens=1000) == {"step_time": 0.5, "tokens_per_s": 2000.0}
    meter.start()
    assert meter.stop(tokens=1000) == {"step_time": 4.0, "tokens_per_s": 250.0}
    with pytest.raises(RuntimeError, match="without start"):
        meter.stop(tokens=1)


def current_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_peak_memory_grows_with_a_large_tensor():
    before = peak_memory_bytes()
    assert before > 0
    # The peak may sit above what is in use now (earlier tests); allocate past it by 200 MiB.
    # ones, not empty: only touched pages count in the resident set.
    extra = max(before - current_memory_bytes(), 0) + 200 * 2**20
    device = "cuda" if torch.cuda.is_available() else "cpu"
    held = torch.ones(extra // 4, dtype=torch.float32, device=device)
    after = peak_memory_bytes()
    assert held.numel() > 0
    assert after - before >= 150 * 2**20


def test_progress_bar_on_rank_zero_only(capsys):
    for rank, enabled in ((1, True), (0, False)):
        bar = progress_bar(10, rank=rank, enabled=enabled)
        bar.update(3)
        bar.set_postfix(loss=1.0)
        bar.close()
    assert capsys.readouterr().err == ""

    bar = progress_bar(10, rank=0, enabled=True, initial=2)
    bar.update(3)
    bar.set_postfix(loss=1.0)
    bar.close()
    assert "5/10" in capsys.readouterr().err
