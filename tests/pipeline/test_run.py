"""The shared stage entry: short errors without tracebacks, exit codes, run-directory safety."""
import subprocess
import sys

import pytest
import yaml

from optimizers import ShardMismatchError
from pipeline.checkpoint import ResumeError
from pipeline.config import ModelConfig, RunConfig, DataConfig, CheckpointConfig
from pipeline.run import EXIT_USER_ERROR, main
from pipeline.rundir import RunDirectory, RunDirError
from tests.conftest import REPO_ROOT


def prepare_run_dir(config, world_size: int = 1):
    """What a stage does to its output_dir: checked up front, claimed at the first write."""
    run = RunDirectory(config)
    run.check(world_size)
    return run.claim()


def run_config(tmp_path, **checkpoint):
    return RunConfig(output_dir=str(tmp_path / "run"), model=ModelConfig(path="m"), data=DataConfig(path="d"),
                     checkpoint=CheckpointConfig(**checkpoint))


def test_fresh_run_dir_gets_the_resolved_config(tmp_path):
    output_dir = prepare_run_dir(run_config(tmp_path))
    assert yaml.safe_load((output_dir / "config.yaml").read_text())["model"]["path"] == "m"


def test_existing_run_is_not_overwritten_unless_asked(tmp_path):
    output_dir = prepare_run_dir(run_config(tmp_path))
    (output_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(RunDirError, match="already holds a run .*metrics.jsonl.*checkpoint.resume=true"):
        prepare_run_dir(run_config(tmp_path))
    assert (output_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'  # untouched
    prepare_run_dir(run_config(tmp_path, resume=True))
    assert (output_dir / "metrics.jsonl").exists()
    (output_dir / "checkpoints" / "step_9").mkdir(parents=True)
    prepare_run_dir(run_config(tmp_path, overwrite=True))
    assert not (output_dir / "metrics.jsonl").exists()
    assert not (output_dir / "checkpoints").exists()  # a later resume must not find the old run's steps


def test_bad_config_exits_2_with_a_message_and_no_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("output_dir: x\nengine:\n  zero_stage: 4\n")
    stages_ran = []
    code = main(stages_ran.append, RunConfig, ["--config", str(config)])
    assert code == EXIT_USER_ERROR and stages_ran == []
    command = [sys.executable, "-c", "import sys; from pipeline.run import main; from pipeline.config import RunConfig;"
               "sys.exit(main(print, RunConfig))", "--config", str(config), "engine.precision=fp8"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_USER_ERROR
    assert "`engine.zero_stage` is 4" in result.stderr and "`engine.precision` is 'fp8'" in result.stderr
    assert "Traceback" not in result.stderr
    debug = subprocess.run(command + ["--debug"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def earlier_run(tmp_path, ranks=1):
    """A run directory as an earlier run leaves it; returns it and a byte snapshot of its files."""
    output_dir = tmp_path / "run"
    checkpoint = output_dir / "checkpoints" / "step_2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("2\n")
    for rank in range(ranks):
        (checkpoint / f"rng_rank{rank}.pt").write_bytes(b"rng")
    (output_dir / "metrics.jsonl").write_text('{"step": 2, "loss": 1.5}\n')
    (output_dir / "config.yaml").write_text("output_dir: the earlier run\n")
    return output_dir, snapshot(output_dir)


def snapshot(directory) -> dict:
    return {path: path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()}


def test_checking_the_run_dir_writes_nothing(tmp_path):
    config = run_config(tmp_path)
    RunDirectory(config).check(world_size=1)
    assert not (tmp_path / "run").exists()  # claimed only by claim(), once the run is going to start
    assert (RunDirectory(config).claim({"train_batch_size": 4}) / "config.yaml").is_file()
    assert (tmp_path / "run" / "ds_config.json").read_text().count("train_batch_size") == 1


def test_resuming_with_another_number_of_ranks_exits_2_before_the_stage_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    output_dir, before = earlier_run(tmp_path, ranks=2)
    config = tmp_path / "resume.yaml"
    config.write_text(f"output_dir: {output_dir}\nmodel: {{path: m}}\ndata: {{path: d}}\ncheckpoint: {{resume: true}}\n")
    stages_ran = []
    assert main(stages_ran.append, RunConfig, ["--config", str(config)]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert "step_2 was written by 2 ranks but this run has 1" in error and "Traceback" not in error
    assert stages_ran == [] and snapshot(output_dir) == before


@pytest.mark.parametrize("error", [ShardMismatchError("Adam-mini: saved state of 'w' covers elements from 0"),
                                   ResumeError("step_2 is not a complete checkpoint")])
def test_resume_errors_raised_in_the_stage_are_user_errors(tmp_path, capsys, error):
    config = tmp_path / "ok.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{path: m}}\ndata: {{path: d}}\n")

    def stage(config):
        raise error

    assert main(stage, RunConfig, ["--config", str(config)]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == f"error: {error}"


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(RunDirError, match="`output_dir` .*run is a file"):
        RunDirectory(run_config(tmp_path)).check(world_size=1)


@pytest.mark.parametrize("override", ["optim.betas=[a,b]", "optim.lr=nan"])
def test_optimizer_values_are_refused_by_the_config_before_any_rank_starts(tmp_path, capsys, override):
    config = tmp_path / "ok.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{path: m}}\ndata: {{path: d}}\n")
    stages_ran = []
    assert main(stages_ran.append, RunConfig, ["--config", str(config), override]) == EXIT_USER_ERROR
    error = capsys.readouterr().err
    assert "Traceback" not in error and f"`{override.split('=')[0]}" in error and stages_ran == []
