"""A stage killed with SIGKILL mid-training, then started again with the same command plus
`checkpoint.resume=true`, ends exactly where a run that never stopped ends: final weights, the
optimizer state of the last checkpoint and every logged metric bitwise equal (CPU fp32, 2 real
DeepSpeed ranks, ZeRO-2 and ZeRO-3; SFT, reward model, ReMax with its sampling, DPO, RLOO at ZeRO-2,
GRPO at ZeRO-3 with two updates per rollout, and PPO at ZeRO-2 with its critic's engine).

Every case's uninterrupted run shares one 2-rank launch, and so do the restarts
(stage_sequence_worker.py runs each command as `python -m` would); each killed run has its own."""
import json
import math
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.stages import STAGES
from tests.conftest import REPO_ROOT, launch_ranks, rank_env, start_ranks, stop_ranks, without_timing
from tests.tiny_models import write_stage_inputs

pytestmark = pytest.mark.slow

STEPS, CHECKPOINT_EVERY, KILL_AFTER_STEP = 7, 2, 3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny Llama, a reward model started from it, pairs (SFT and reward data) and prompts."""
    root = tmp_path_factory.mktemp("crash_inputs")
    write_stage_inputs(root)
    return root


def stage_config(stage: str, zero_stage: int, inputs: Path) -> dict:
    data_format = STAGES[stage].data_format
    data_file = "prompts.jsonl" if STAGES[stage].samples else "pairs.jsonl"
    config = dict(seed=0, model={"path": str(inputs / "model")},
                  data={"path": str(inputs / data_file), "format": data_format, "eval_fraction": 0.125,
                        "max_length": 24, "max_prompt_length": 12},
                  optim={"lr": 2e-3, "warmup_steps": 2, "betas": [0.9, 0.95]},
                  engine={"zero_stage": zero_stage, "micro_batch_size": 2},
                  training={"epochs": 4, "max_steps": STEPS, "eval_every_steps": 3},
                  logging={"progress_bar": False, "tensorboard": False},
                  checkpoint={"every_steps": CHECKPOINT_EVERY, "keep_last": 2})
    if stage == "remax":
        config["remax"] = {"reward_model_path": str(inputs / "reward"), "max_new_tokens": 6, "eval_every_steps": 3,
                           "ref_zero_stage": 3, "reward_zero_stage": 3}
    if stage in ("rloo", "grpo"):
        config[stage] = {"reward_model_path": str(inputs / "reward"), "max_new_tokens": 6, "eval_every_steps": 3,
                         "num_samples": 2, "ref_zero_stage": 3, "reward_zero_stage": 3}
    if stage == "ppo":  # two updates per rollout (the default), the critic from the reward model
        config["ppo"] = {"reward_model_path": str(inputs / "reward"), "max_new_tokens": 6, "eval_every_steps": 3,
                         "ref_zero_stage": 3, "reward_zero_stage": 3}
    if stage == "grpo":  # the kept rollout: resumed at step 2 or 4, between two rollouts
        config["grpo"]["updates_per_rollout"] = 2
    if stage == "dpo":  # the frozen reference sharded with the policy at ZeRO-3, a full copy at ZeRO-2
        config["dpo"] = {"beta": 0.1, "ref_zero_stage": 3 if zero_stage == 3 else 0}
    return config


def stage_args(stage: str, config_file: Path, output_dir: Path, *overrides) -> list:
    return ["--module", f"stages.{stage}", "--config", config_file, f"output_dir={output_dir}", *overrides]


def logged_steps(output_dir: Path) -> int:
    """The highest training step with a complete line in metrics.jsonl (0 before the first)."""
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [int(match) for match in re.findall(r'^\{"step": (\d+), "(?!eval/)', path.read_text(), re.MULTILINE)]
    return max(steps, default=0)


def after_step(step: int, delay: float = 0.0):
    """A kill moment: `delay` seconds after `step` is logged."""
    def reached(output_dir: Path, state: dict) -> bool:
        if logged_steps(output_dir) < step:
            return False
        state.setdefault("logged_at", time.monotonic())
        return time.monotonic() - state["logged_at"] >= delay
    return reached


def inside_checkpoint_write(step: int):
    """A kill moment: the checkpoint of `step` has started to appear on disk but is not complete."""
    def reached(output_dir: Path, state: dict) -> bool:
        checkpoint = output_dir / "checkpoints" / f"step_{step}"
        return checkpoint.is_dir() and any(checkpoint.iterdir()) and not (checkpoint / "COMPLETE").exists()
    return reached


def launch_and_kill(args: list, output_dir: Path, moment) -> None:
    """Starts 2 ranks and SIGKILLs every rank once `moment(output_dir, state)` holds."""
    processes = start_ranks(2, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, state = time.monotonic() + 600, {}
    running = lambda: all(process.poll() is None for process in processes)  # noqa: E731
    while running() and not moment(output_dir, state) and time.monotonic() < deadline:
        time.sleep(0.002)
    finished = not running()
    stop_ranks(processes)  # both ranks share one process group
    assert not finished, f"a rank ended (exit {[p.returncode for p in processes]}) before it could be killed"
    survivors = subprocess.run(["pgrep", "-f", str(output_dir)], capture_output=True, text=True).stdout.split()
    assert not survivors, f"ranks survived the kill: {survivors}"


def strip_timing(output_dir: Path) -> list:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return without_timing(rows)


def safetensors_of(directory: Path) -> dict:
    return {str(path.relative_to(directory)) + ":" + name: tensor
            for path in sorted(directory.rglob("*.safetensors")) for name, tensor in load_file(path).items()}


def optimizer_state_of(checkpoint: Path) -> dict:
    """Every tensor in DeepSpeed's per-rank optimizer files (PPO's critic's in `critic/` too), keyed by file
    and path in the nested state."""
    found = {}

    def walk(value, key):
        if torch.is_tensor(value):
            found[key] = value
        elif isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}/{name}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{key}/{index}")

    for path in sorted(checkpoint.rglob("*optim_states.pt")):
        # DeepSpeed's own files, written by this test's runs (they hold more than tensors).
        walk(torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"],
             str(path.relative_to(checkpoint)))
    return found


def assert_same_tensors(expected: dict, actual: dict, what: str) -> None:
    assert expected.keys() == actual.keys() and expected, what
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


KILLED_CASES = [("sft", 2), ("sft", 3), ("reward", 2), ("reward", 3), ("remax", 2), ("remax", 3), ("dpo", 2),
                ("dpo", 3), ("rloo", 2), ("grpo", 3), ("ppo", 2), ("ppo", 3)]
ACCUMULATION_ZERO_STAGES = (2, 3)


def accumulation_config(zero_stage: int, inputs: Path) -> dict:
    """56 training rows, micro-batch 2 on 2 ranks: 14 micro-batches per rank per epoch, accumulation 3.
    Each epoch holds 4 whole windows (2 micro-batches left out), 3 epochs: 12 optimizer steps."""
    config = stage_config("sft", zero_stage, inputs)
    config["engine"]["gradient_accumulation_steps"] = 3
    config["training"].update(epochs=3, max_steps=None)
    return config


def sequence_run(args: list) -> str:
    """stage_args as one `--run` of stage_sequence_worker.py."""
    assert args[0] == "--module"
    return shlex.join([str(arg) for arg in args[1:]])


@pytest.fixture(scope="module")
def crashes(inputs, tmp_path_factory):
    """Per case (stage, ZeRO stage, kill after step): the uninterrupted run's and the killed-then-resumed
    run's directories and the step the restart resumed from. Also a finished 4-step run on 2 ranks."""
    root = tmp_path_factory.mktemp("crashes")
    cases = {f"{stage}-{zero}": (stage, stage_config(stage, zero, inputs), after_step(KILL_AFTER_STEP))
             for stage, zero in KILLED_CASES}
    for zero in ACCUMULATION_ZERO_STAGES:  # killed at step 7: checkpoint 6 is mid-epoch 2
        cases[f"accumulation-{zero}"] = ("sft", accumulation_config(zero, inputs), after_step(7))
    # Killed while step 4's checkpoint is being written (ZeRO-3: a file per rank), and after a step
    # drawn afresh on each run (named in the test's failure message).
    cases["mid-checkpoint"] = ("sft", stage_config("sft", 3, inputs), inside_checkpoint_write(4))
    # (At once after the drawn step: on a quiet machine a tiny step takes milliseconds, and a delay
    # could outlast the run.)
    random_step, random_delay = random.randint(1, STEPS - 2), 0.0
    cases["random-step"] = ("sft", stage_config("sft", 2, inputs), after_step(random_step, random_delay))
    runs, restarts = [], []
    for name, (stage, config, _) in cases.items():
        config_file = root / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(config))
        runs.append(sequence_run(stage_args(stage, config_file, root / name / "uninterrupted")))
        restarts.append(sequence_run(stage_args(stage, config_file, root / name / "crashed", "checkpoint.resume=true")))
    four_steps = stage_config("sft", 2, inputs)
    four_steps["training"]["max_steps"] = 4
    (root / "four_steps.yaml").write_text(yaml.safe_dump(four_steps))
    runs.append(sequence_run(stage_args("sft", root / "four_steps.yaml", root / "four_steps")))

    worker = "tests/stages/stage_sequence_worker.py"
    launch_ranks(2, [worker, "--out", root / "uninterrupted.json", *[f"--run={run}" for run in runs]])
    for name, (stage, _, moment) in cases.items():
        crashed = root / name / "crashed"
        launch_and_kill(stage_args(stage, root / f"{name}.yaml", crashed), crashed, moment)
        assert not (crashed / "final").exists()
    written_when_killed = sorted(path.name for path in (root / "mid-checkpoint" / "crashed" / "checkpoints" /
                                                         "step_4").iterdir())
    launch_ranks(2, [worker, "--out", root / "restarts.json", *[f"--run={run}" for run in restarts]])
    first, restarted = (json.loads((root / f"{which}.json").read_text())["runs"]
                        for which in ("uninterrupted", "restarts"))
    assert all(run["exit"] == 0 for run in first + restarted), first + restarted
    results = {name: {"uninterrupted": root / name / "uninterrupted", "crashed": root / name / "crashed",
                      "resumed_from": run["resumed_from"]} for name, run in zip(cases, restarted)}
    results["four_steps"] = {"config": root / "four_steps.yaml", "run": root / "four_steps"}
    results["mid-checkpoint"]["written_when_killed"] = written_when_killed
    results["random-step"]["moment"] = f"killed once step {random_step} was logged"
    return results


@pytest.mark.parametrize("stage, zero_stage", KILLED_CASES)
def test_a_run_killed_mid_training_resumes_to_exactly_the_uninterrupted_result(crashes, stage, zero_stage):
    case = crashes[f"{stage}-{zero_stage}"]
    uninterrupted, crashed = case["uninterrupted"], case["crashed"]
    assert case["resumed_from"] in (2, 4), "the restart did not resume from a checkpoint"

    assert_same_tensors(safetensors_of(uninterrupted / "final"), safetensors_of(crashed / "final"), "final weights")
    last_checkpoint = f"checkpoints/step_{STEPS - STEPS % CHECKPOINT_EVERY}"
    assert_same_tensors(optimizer_state_of(uninterrupted / last_checkpoint),
                        optimizer_state_of(crashed / last_checkpoint), "optimizer state")
    assert strip_timing(crashed) == strip_timing(uninterrupted)
    if stage == "ppo":  # the critic resumed with the actor: its export is bitwise the uninterrupted one's
        assert any("critic/" in key for key in optimizer_state_of(crashed / last_checkpoint))
        assert_same_tensors(safetensors_of(uninterrupted / "critic"), safetensors_of(crashed / "critic"), "critic")
    if stage in ("remax", "rloo", "grpo", "ppo"):
        assert (json.loads((crashed / "best" / "best.json").read_text())
                == json.loads((uninterrupted / "best" / "best.json").read_text()))


@pytest.mark.parametrize("zero_stage", ACCUMULATION_ZERO_STAGES)
def test_accumulation_that_does_not_divide_the_epoch_stays_in_step_with_deepspeed(crashes, zero_stage):
    """Accumulation 3 over 14 micro-batches per rank and epoch (accumulation_config): a kill in the
    second epoch and a resume end bitwise where the uninterrupted run ends."""
    case = crashes[f"accumulation-{zero_stage}"]
    uninterrupted, crashed = case["uninterrupted"], case["crashed"]
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train_rows] == list(range(1, 13))
    assert all(math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in train_rows)
    # DeepSpeed's own counters in the last checkpoint (step 10) agree with the loop's.
    states_file = next((uninterrupted / "checkpoints/step_10").glob("*mp_rank_00_model_states.pt"))  # ZeRO-3: per rank
    model_states = torch.load(states_file, map_location="cpu", weights_only=False)  # DeepSpeed's, from this run
    assert model_states["global_steps"] == 10 and model_states["lr_scheduler"]["last_epoch"] == 10
    assert json.loads((uninterrupted / "checkpoints/step_10/trainer_state.json").read_text())["epoch"] == 2

    assert case["resumed_from"] in (6, 8), "the restart did not resume in the second epoch"
    assert_same_tensors(safetensors_of(uninterrupted / "final"), safetensors_of(crashed / "final"), "final weights")
    assert strip_timing(crashed) == strip_timing(uninterrupted)


@pytest.mark.parametrize("case", ["mid-checkpoint", "random-step"])
def test_a_run_killed_inside_a_checkpoint_write_or_after_a_random_step_resumes_exactly(crashes, case):
    result = crashes[case]
    uninterrupted, crashed = result["uninterrupted"], result["crashed"]
    if case == "mid-checkpoint":
        # Some of step 4's files were on disk, COMPLETE was not: the restart takes step 2 and rewrites step 4.
        assert result["written_when_killed"] and "COMPLETE" not in result["written_when_killed"]
        assert result["resumed_from"] == 2
    else:  # before the first checkpoint the restart begins at step 0
        assert result["resumed_from"] in (None, 2, 4, 6), result["moment"]
    assert_same_tensors(safetensors_of(uninterrupted / "final"), safetensors_of(crashed / "final"),
                        f"final weights ({result.get('moment', case)})")
    assert strip_timing(crashed) == strip_timing(uninterrupted), result.get("moment", case)


def test_resuming_with_another_number_of_ranks_is_refused_before_any_step(crashes):
    config_file, run_dir = crashes["four_steps"]["config"], crashes["four_steps"]["run"]  # written by 2 ranks
    before = {path: path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}

    command = [sys.executable, "-m", "stages.sft", "--config", str(config_file), f"output_dir={run_dir}",
               "checkpoint.resume=true"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "step_2 was written by 2 ranks but this run has 1" in result.stderr
    assert "Resume with 2 ranks" in result.stderr and "Traceback" not in result.stderr
    after = {path: path.read_bytes() for path in sorted(run_dir.rglob("*")) if path.is_file()}
    assert after == before  # the refused run changed nothing the first one wrote
