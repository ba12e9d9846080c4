"""The shared stage entry: short errors without tracebacks, exit codes, run-directory safety."""
import subprocess
import sys

import pytest
import yaml

from pipeline.config import ModelConfig, RunConfig, DataConfig, CheckpointConfig
from pipeline.run import EXIT_USER_ERROR, RunDirError, main, prepare_run_dir
from tests.conftest import REPO_ROOT


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
