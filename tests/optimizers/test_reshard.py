"""Adam-mini saved on W DeepSpeed ranks continues on W' ranks (optimizers.reshard), at ZeRO-1, 2 and 3
with one group per parameter and ZeRO-2 and 3 with shared groups, from 3 ranks to 2 and from 2 to 3.

Three launches (reshard_worker.py): 3 ranks save; 2 ranks save and resume the 3-rank checkpoints;
3 ranks resume the 2-rank checkpoints. Each step trains the same 6 rows at any world size, so the
run that never stopped is one unsharded trajectory.
"""
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT, launch_ranks, rank_env, read_json
from tests.optimizers.test_zero import EXACT

pytestmark = pytest.mark.slow

CASES = ["zero1", "zero2", "zero3", "zero2_shared", "zero3_shared"]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    out = tmp_path_factory.mktemp("reshard")
    launch_ranks(3, ["tests/optimizers/reshard_worker.py", "--out", out / "save3.json", "--save-dir", out / "ranks3"])
    launch_ranks(2, ["tests/optimizers/reshard_worker.py", "--out", out / "run2.json", "--save-dir", out / "ranks2",
                     "--resume-dir", out / "ranks3"])
    launch_ranks(3, ["tests/optimizers/reshard_worker.py", "--out", out / "resume3.json",
                     "--resume-dir", out / "ranks2"])
    return {"3to2": read_json(out / "run2.json"), "2to3": read_json(out / "resume3.json"),
            "saved3": read_json(out / "save3.json"), "dir": out}


@pytest.mark.parametrize("direction", ["3to2", "2to3"])
@pytest.mark.parametrize("case", CASES)
def test_resume_on_another_rank_count_follows_the_uninterrupted_run(launches, direction, case):
    outcome = launches[direction][f"resume_{case}"]
    assert "error" not in outcome, outcome.get("error")
    assert outcome["saved_world_size"] == int(direction[0])
    assert outcome["zero_stage"] == int(case[4])
    # The whole-parameter state put together from the ranks' pieces is the unsharded optimizer's.
    assert outcome["consolidated_state_max_delta"] <= EXACT
    assert len(outcome["max_delta_per_step"]) == 10
    assert max(outcome["max_delta_per_step"]) <= EXACT
    assert outcome["optimizer_steps"] == [15]


@pytest.mark.parametrize("case", CASES)
def test_saving_runs_follow_the_reference_too(launches, case):
    for saved in (launches["saved3"], launches["3to2"]):
        outcome = saved[f"save_{case}"]
        assert "error" not in outcome, outcome.get("error")
        assert max(outcome["max_delta_per_step"]) <= EXACT


def _reshard_cli(*args):
    return subprocess.run([sys.executable, "-m", "optimizers.reshard", *map(str, args)], cwd=REPO_ROOT,
                          env=rank_env(), capture_output=True, text=True, timeout=300)


def test_command_line_writes_the_full_state(launches, tmp_path):
    result = _reshard_cli(launches["dir"] / "ranks2" / "zero3", "--out", tmp_path / "full.pt")
    assert result.returncode == 0, result.stderr
    assert "from 2 ranks at ZeRO-3" in result.stdout
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    assert full["world_size"] == 2 and full["params"]["model.embed_tokens.weight"]["exp_avg"].numel() == 203 * 96


def test_command_line_refuses_a_directory_without_zero_files(tmp_path):
    result = _reshard_cli(tmp_path)
    assert result.returncode == 2
    assert "holds no ZeRO optimizer files" in result.stderr and "Traceback" not in result.stderr
