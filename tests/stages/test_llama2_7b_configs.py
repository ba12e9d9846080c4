"""The Llama-2-7B configs validate and dry-run as a fresh clone has them: the model on the meta device
from the shipped config.json alone (no weights, no earlier stage's export), and a memory plan with
Adam-mini next to AdamW."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, rank_env
from pipeline.run import run_as_main

pytestmark = pytest.mark.slow
CONFIGS = {"sft_full": "stages.sft", "sft_lora": "stages.sft", "reward": "stages.reward", "remax": "stages.remax",
           "dpo": "stages.dpo", "rloo": "stages.rloo", "grpo": "stages.grpo", "grpo_gsm8k": "stages.grpo",
           "ppo": "stages.ppo"}


def run_module(module: str, argv: list, capsys) -> tuple:
    """(exit code, stdout, stderr) of `python -m MODULE ARGV`, run in this process (the same entry
    point and argument parsing; one interpreter start for all the configs instead of one each)."""
    code = run_as_main(module, argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def dry_run(name: str, capsys, monkeypatch) -> str:
    monkeypatch.chdir(REPO_ROOT)
    code, out, err = run_module(CONFIGS[name], ["--config", f"configs/llama2-7b/{name}.yaml", "--dry-run",
                                                "--world-size", "2"], capsys)
    assert code == 0, out + err
    # model.path (the weights, or the SFT export for reward and ReMax) is not there: the architecture is used.
    assert "holds no model yet; using the architecture in `model.architecture` configs/llama2-7b/llama-2-7b" in err
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_dry_runs_with_a_plan(name, capsys, monkeypatch):
    plan = dry_run(name, capsys, monkeypatch)
    total = int(re.search(r"  parameters\s+([\d,]+)", plan).group(1).replace(",", ""))
    trainable = int(re.search(r"trainable parameters\s+([\d,]+)", plan).group(1).replace(",", ""))
    ratio = float(re.search(r"adam_mini / adamw\s+([\d.]+)", plan).group(1))
    if name == "sft_lora":
        # Rank-128 adapters on 7 projections of 32 layers: 128 x (4 x 8192 + 3 x 15104) each layer.
        lora = 32 * 128 * (4 * 8192 + 3 * 15104)
        assert (total, trainable) == (6_738_415_616 + lora, lora)
        assert 0.5 < ratio <= 0.51  # one value per 128-wide lora_B row
    elif name == "reward":
        # Planned as the reward model it trains: no LM head (32000 x 4096), a 4096-wide v_head.
        assert total == trainable == 6_738_415_616 - 32000 * 4096 + 4096
    else:
        assert total == trainable == 6_738_415_616
        assert 0.499 <= ratio <= 0.501  # printed to 3 decimals
    chosen = plan.split("<- chosen")[0].splitlines()[-1]
    assert ("adam_mini " in chosen) == (name in ("sft_full", "remax", "dpo", "rloo", "grpo", "grpo_gsm8k", "ppo"))


def test_configs_carry_the_reference_settings():
    import yaml
    settings = {name: yaml.safe_load(Path(REPO_ROOT, "configs/llama2-7b", f"{name}.yaml").read_text())
                for name in CONFIGS}
    assert (settings["sft_full"]["optim"]["lr"], settings["sft_full"]["engine"]["micro_batch_size"]) == (2e-6, 20)
    assert settings["sft_lora"]["model"]["lora"]["r"] == 128
    assert settings["sft_lora"]["engine"]["gradient_accumulation_steps"] == 2
    assert (settings["reward"]["optim"]["lr"], settings["reward"]["engine"]["micro_batch_size"]) == (2e-5, 10)
    assert all(s["engine"]["precision"] == "bf16" and s["engine"]["zero_stage"] == 2 for s in settings.values())
    remax = settings["remax"]
    assert (remax["optim"]["lr"], remax["engine"]["micro_batch_size"], remax["remax"]["kl_coef"]) == (2e-7, 12, 0.1)
    assert remax["remax"]["ref_offload"] and remax["remax"]["reward_offload"]
    dpo = settings["dpo"]
    assert (dpo["optim"]["lr"], dpo["dpo"]["beta"], dpo["dpo"]["loss_type"]) == (5e-7, 0.1, "sigmoid")
    assert dpo["data"]["format"] == "pairwise" and dpo["dpo"]["ref_offload"]
    rloo, grpo = settings["rloo"]["rloo"], settings["grpo"]["grpo"]
    assert (rloo["num_samples"], rloo["kl_penalty"], grpo["num_samples"], grpo["kl_penalty"]) == (4, "reward", 8, "loss")
    ppo = settings["ppo"]["ppo"]
    assert (ppo["num_samples"], ppo["critic_init"], ppo["updates_per_rollout"]) == (1, "reward", 2)
    assert all(section["ref_offload"] and section["reward_offload"] for section in (rloo, grpo, ppo))
    gsm8k = settings["grpo_gsm8k"]  # verifiable rewards alone: the answers checked, no reward model
    assert "reward_model_path" not in gsm8k["grpo"] and gsm8k["grpo"]["ref_offload"]
    assert [f["name"] for f in gsm8k["reward"]["functions"]] == ["math_answer", "format"]
    assert (gsm8k["data"]["path"], gsm8k["data"]["subset"]) == ("openai/gsm8k", "main")


def test_memory_plan_runs_from_a_fresh_clone():
    """As a user types it, in a process of its own."""
    command = [sys.executable, "-m", "pipeline.plan", "--config", "configs/llama2-7b/sft_full.yaml",
               "--world-sizes", "2,8", "--gpu-memory", "80"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=rank_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 + 2 * 4 * 2  # header, optimizers x stages x world sizes


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_memory_plan_runs_for_every_config(name, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    code, out, err = run_module("pipeline.plan", ["--config", f"configs/llama2-7b/{name}.yaml", "--world-sizes",
                                                  "2,8", "--gpu-memory", "80"], capsys)
    assert code == 0, out + err
    assert len(out.strip().splitlines()) == 1 + 2 * 4 * 2  # header, optimizers x stages x world sizes
