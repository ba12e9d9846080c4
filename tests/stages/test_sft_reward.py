"""SFT (full and LoRA) and reward-model training as users run them: `deepspeed --module stages.X`
on 2 CPU ranks at ZeRO-2, on a tiny model and data built here."""
import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models import RewardModel
from stages.reward import pairwise_loss
from tests.conftest import launch_ranks
from tests.tiny_models import save_tiny_model_dir, write_separable_pairs

pytestmark = pytest.mark.slow


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_rows(metrics, key):
    return [row for row in metrics if key in row]


def write_config(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    """Pairs an easy rule separates: the chosen answer is good, the rejected one bad."""
    return write_separable_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 48)


def base_config(run_dir, model, data, data_format, **engine):
    return dict(output_dir=str(run_dir), seed=0, model={"path": str(model)},
                data={"path": str(data), "format": data_format, "eval_fraction": 0.25, "max_length": 24,
                      "max_prompt_length": 16},
                optim={"lr": 3e-3, "warmup_steps": 2, "betas": [0.9, 0.95]},
                engine={"zero_stage": 2, "micro_batch_size": 4, **engine},
                training={"epochs": 4, "eval_every_steps": 4}, logging={"progress_bar": False})


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model, preference_data):
    run_dir = tmp_path_factory.mktemp("sft")
    config = write_config(run_dir / "sft.yaml", **base_config(run_dir / "run", tiny_model, preference_data, "sft"))
    launch_ranks(2, ["--module", "stages.sft", "--config", config])
    return run_dir / "run"


def test_sft_eval_loss_falls(sft_run):
    evals = eval_rows(read_metrics(sft_run), "eval/loss")
    assert evals[0]["step"] == 0 and len(evals) >= 3
    assert evals[-1]["eval/loss"] < 0.6 * evals[0]["eval/loss"]
    assert evals[-1]["eval/perplexity"] < evals[0]["eval/perplexity"]


def test_sft_logs_every_step_and_writes_the_run_directory(sft_run):
    steps = [row for row in read_metrics(sft_run) if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, len(steps) + 1))
    for name in ("lr", "grad_norm", "tokens_per_s", "step_time", "peak_memory_bytes"):
        assert all(row[name] >= 0 for row in steps), name
    # engine.step() is timed on its own: part of the step, never all of it (forward and backward come first).
    assert all(0 < row["optimizer_step_time"] < row["step_time"] for row in steps)
    assert steps[0]["optimizer_state_bytes"] > 0
    assert yaml.safe_load((sft_run / "config.yaml").read_text())["engine"]["zero_stage"] == 2
    assert json.loads((sft_run / "ds_config.json").read_text())["zero_allow_untested_optimizer"] is True
    assert list((sft_run / "tensorboard").iterdir())
    exported = AutoModelForCausalLM.from_pretrained(sft_run / "final")
    assert sum(p.numel() for p in exported.parameters()) > 0


def test_sft_lora_packed_exports_adapter_and_merged(tmp_path, tiny_model, preference_data):
    """LoRA, with rows packed (`data.packing`): one pack of at most 2 rows' budget per micro-batch."""
    run_dir = tmp_path / "run"
    values = base_config(run_dir, tiny_model, preference_data, "sft", micro_batch_size=1)
    values["model"]["lora"] = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    budget = 2 * values["data"]["max_length"]
    values["data"].update(packing=True, packing_tokens=budget)
    values["training"] = {"max_steps": 6, "epochs": 4}
    launch_ranks(2, ["--module", "stages.sft", "--config", write_config(tmp_path / "lora.yaml", **values)])
    metrics = read_metrics(run_dir)
    evals = eval_rows(metrics, "eval/loss")
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    # Each rank's micro-batch held more tokens than one row can have, and no more than the budget.
    steps = [row for row in metrics if "loss" in row]
    assert len(steps) == 6
    for row in steps:
        assert values["data"]["max_length"] * 2 < row["tokens_per_s"] * row["step_time"] <= 2 * budget + 1e-6
    assert (run_dir / "final" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "final" / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_reward_accuracy_rises_above_chance(tmp_path, sft_run, preference_data):
    run_dir = tmp_path / "run"
    values = base_config(run_dir, sft_run / "final", preference_data, "pairwise")
    values["optim"]["lr"] = 1e-3
    launch_ranks(2, ["--module", "stages.reward", "--config", write_config(tmp_path / "reward.yaml", **values)])
    evals = eval_rows(read_metrics(run_dir), "eval/accuracy")
    assert evals[-1]["eval/accuracy"] >= 0.9
    assert evals[-1]["eval/chosen_score"] > evals[-1]["eval/rejected_score"]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    # The exported reward model reloads and ranks a fresh pair the way training taught it.
    model = RewardModel.from_pretrained(run_dir / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    pair = tokenizer(["human what is the dog assistant one dog is good",
                      "human what is the dog assistant one dog is bad"], return_tensors="pt")
    with torch.no_grad():
        good, bad = model(pair["input_ids"], pair["attention_mask"])
    assert good > bad


def test_pairwise_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = -torch.log(torch.sigmoid(torch.tensor([2.0, 0.0, -2.0]))).mean()
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected.item(), rel=1e-6)
