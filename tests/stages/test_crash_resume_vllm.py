"""Rollouts from vLLM are reproducible from the seed and the step (each request seeded from the run's
seed, the rollout's step and micro-batch, the rank and the row): GRPO with `rollout.engine: vllm`,
killed with SIGKILL mid-training and resumed, ends bitwise where the uninterrupted run ends (final
weights and every logged metric), on 2 real DeepSpeed CPU ranks."""
import importlib.util
import json

import pytest
import yaml

from tests.conftest import launch_ranks
from tests.stages.test_crash_resume import (after_step, assert_same_tensors, launch_and_kill, safetensors_of,
                                            sequence_run, stage_args, stage_config, strip_timing)
from tests.tiny_models import write_stage_inputs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed (bash scripts/setup.sh --vllm)")]


def test_a_vllm_run_killed_mid_training_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    write_stage_inputs(tmp_path)
    config = stage_config("grpo", 2, tmp_path)
    config["rollout"] = {"engine": "vllm"}
    config_file = tmp_path / "grpo.yaml"
    config_file.write_text(yaml.safe_dump(config))
    uninterrupted, crashed = tmp_path / "uninterrupted", tmp_path / "crashed"
    worker = "tests/stages/stage_sequence_worker.py"
    launch_ranks(2, [worker, "--out", tmp_path / "first.json",
                     f"--run={sequence_run(stage_args('grpo', config_file, uninterrupted))}"])
    launch_and_kill(stage_args("grpo", config_file, crashed), crashed, after_step(3))
    assert not (crashed / "final").exists()
    launch_ranks(2, [worker, "--out", tmp_path / "restart.json",
                     f"--run={sequence_run(stage_args('grpo', config_file, crashed, 'checkpoint.resume=true'))}"])
    [restart] = json.loads((tmp_path / "restart.json").read_text())["runs"]
    assert restart["exit"] == 0 and restart["resumed_from"] in (2, 4), restart

    assert_same_tensors(safetensors_of(uninterrupted / "final"), safetensors_of(crashed / "final"), "final weights")
    rows = strip_timing(uninterrupted)
    assert strip_timing(crashed) == rows
    assert any("sampler_logprob_gap" in row for row in rows)  # the rollouts did come from vLLM
