"""DPO: the loss, its gradient and its metrics on hand-built tensors; full and LoRA runs on 2 real
DeepSpeed CPU ranks; bad settings refused by field."""
import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import DataConfig
from pipeline.data import collate_pairwise, prepare_dataset
from pipeline.evaluate import curves
from pipeline.run import EXIT_USER_ERROR, main
from stages.dpo import DpoConfig, dpo_loss, pair_means, reward_sums, run
from tests.conftest import launch_ranks
from tests.tiny_models import save_tiny_model_dir, write_separable_pairs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- the loss, by hand --------------------------------------------------------------------------

POLICY_CHOSEN, POLICY_REJECTED = [-1.0, -2.0, -4.0], [-3.0, -1.0, -1.0]
REF_CHOSEN, REF_REJECTED = [-1.5, -2.0, -5.0], [-2.5, -1.5, -1.0]
MARGINS = [1.0, -0.5, 1.0]  # (pc - rc) - (pr - rr) per pair: 0.5 + 0.5, 0 - 0.5, 1 - 0


def losses_and_grads(beta, loss_type):
    chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    rejected = torch.tensor(POLICY_REJECTED, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, torch.tensor(REF_CHOSEN),
                                                        torch.tensor(REF_REJECTED), beta, loss_type)
    losses.sum().backward()
    return losses.detach(), chosen_rewards, rejected_rewards, chosen.grad, rejected.grad


def test_sigmoid_loss_rewards_and_gradient_match_a_hand_computation():
    beta = 0.1
    losses, chosen_rewards, rejected_rewards, chosen_grad, rejected_grad = losses_and_grads(beta, "sigmoid")
    assert losses.tolist() == pytest.approx([-log_sigmoid(beta * h) for h in MARGINS], abs=1e-7)
    assert chosen_rewards.tolist() == pytest.approx([0.05, 0.0, 0.1], abs=1e-7)     # beta (pc - rc)
    assert rejected_rewards.tolist() == pytest.approx([-0.05, 0.05, 0.0], abs=1e-7)  # beta (pr - rr)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    # d/d pc of -log sigmoid(beta h) = -beta sigmoid(-beta h): descent raises the chosen answer's
    # log-prob and lowers the rejected one's, hardest where the pair is ranked wrongly.
    expected = [-beta / (1 + math.exp(beta * h)) for h in MARGINS]
    assert chosen_grad.tolist() == pytest.approx(expected, abs=1e-7)
    assert rejected_grad.tolist() == pytest.approx([-g for g in expected], abs=1e-7)
    assert (chosen_grad < 0).all() and (rejected_grad > 0).all()
    assert chosen_grad[1] < chosen_grad[0]  # the wrongly ordered pair (margin -0.5) pulls harder


def test_ipo_loss_regresses_the_margin_onto_one_over_two_beta_from_both_sides():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    losses, _, _, chosen_grad, rejected_grad = losses_and_grads(beta, "ipo")
    assert losses.tolist() == pytest.approx([(h - 2.0) ** 2 for h in MARGINS], abs=1e-6)
    assert chosen_grad.tolist() == pytest.approx([2 * (h - 2.0) for h in MARGINS], abs=1e-6)
    assert rejected_grad.tolist() == pytest.approx([-2 * (h - 2.0) for h in MARGINS], abs=1e-6)
    # Past the target IPO pushes back, where the sigmoid loss would keep widening the margin.
    chosen = torch.tensor([0.0], requires_grad=True)
    dpo_loss(chosen, torch.tensor([-3.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta, "ipo")[0].sum().backward()
    assert chosen.grad.item() == pytest.approx(2.0)  # 2 (3 - 2) > 0: descent lowers the chosen log-prob


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(*[torch.zeros(1)] * 4, 0.1, "hinge")


def test_metrics_are_per_pair_means_over_micro_batches_and_the_loss_per_micro_batch():
    first = reward_sums(torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.2]))
    second = reward_sums(torch.tensor([0.5]), torch.tensor([-0.5]))
    total = {name: first[name] + second[name] for name in first}
    metrics = pair_means({**total, "pairs": 3, "loss": 1.2, "micro_batches": 2})
    assert metrics["rewards/chosen"] == pytest.approx((0.3 - 0.1 + 0.5) / 3)
    assert metrics["rewards/rejected"] == pytest.approx((0.1 + 0.2 - 0.5) / 3)
    assert metrics["rewards/margins"] == pytest.approx((0.2 - 0.3 + 1.0) / 3)
    assert metrics["rewards/accuracy"] == pytest.approx(2 / 3)  # the second pair is ranked wrongly
    assert metrics["loss"] == pytest.approx(0.6)


# ---- bad settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("dpo.loss_type=hinge", "`dpo.loss_type` is 'hinge'; use one of sigmoid, ipo"),
    ("dpo.beta=0", "`dpo.beta` is 0.0; it must be positive"),
    ("data.format=sft", "`data.format` is 'sft'; DPO trains on pairwise data"),
    ("dpo.ref_zero_stage=2", "`dpo.ref_zero_stage` is 2; use 0 (a full copy per rank) or 3"),
    ("model.lora.enabled=true", "`dpo.ref_model_path` is set with `model.lora.enabled`"),
])
def test_bad_settings_are_refused_with_one_message_naming_the_field(tmp_path, capsys, override, message):
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"path": "d", "format": "pairwise"},
                                      "dpo": {"ref_model_path": "r"} if "lora" in override else {}}))
    code = main(run, DpoConfig, ["--config", str(config), override])
    error = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "Traceback" not in error
    assert message in error and "1 problem(s)" in error


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


def test_data_without_pairs_is_refused_naming_the_file_and_rows(tmp_path, capsys, tiny_model):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "what", "chosen": " good"}) + "\n" + json.dumps({"prompt": "what"}) + "\n")
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model)},
                                      "data": {"path": str(data), "format": "pairwise"}}))
    code = main(run, DpoConfig, ["--config", str(config)])
    error = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "Traceback" not in error
    assert "pairs.jsonl: kept 0 of 2 rows; skipped 1 missing field 'rejected' (row 1), " \
           "1 missing field 'chosen' (row 2)" in error
    assert not (tmp_path / "run").exists()


# ---- real runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Pairs an easy rule separates: the chosen answer is good, the rejected one bad; 8 held out."""
    return write_separable_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 64)


DATA = dict(format="pairwise", eval_fraction=0.125, max_length=24, max_prompt_length=16)


def dpo_run(tmp_path, model_dir, data_path, **sections):
    values = dict(output_dir=str(tmp_path / "run"), seed=0, model={"path": str(model_dir)},
                  data={"path": str(data_path), **DATA}, optim={"lr": 2e-3, "warmup_steps": 2, "betas": [0.9, 0.95]},
                  engine={"zero_stage": 2, "micro_batch_size": 4},
                  training={"epochs": 2, "eval_every_steps": 7}, logging={"progress_bar": False},
                  dpo={"beta": 0.1})
    for name, section in sections.items():
        values[name] = {**values[name], **section}
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(values))
    launch_ranks(2, ["--module", "stages.dpo", "--config", config])
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")


@pytest.mark.slow
def test_two_rank_full_run_widens_the_held_out_margin(tmp_path, tiny_model, pairs):
    metrics = dpo_run(tmp_path, tiny_model, pairs)
    steps = [row for row in metrics if "loss" in row]
    evals = [row for row in metrics if "eval/loss" in row]
    assert [row["step"] for row in steps] == list(range(1, 15))  # 56 pairs / 8 per step x 2 epochs
    for name in (*REWARD_METRICS, "logps/chosen", "logps/rejected", "grad_norm", "lr"):
        assert all(math.isfinite(row[name]) for row in steps), name
    assert [row["step"] for row in evals] == [0, 7, 14]
    start, end = evals[0], evals[-1]
    # Step 0: the policy is the reference, so every implicit reward is 0 and the loss log 2.
    assert abs(start["eval/rewards/margins"]) < 1e-6 and start["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["eval/rewards/accuracy"] == 0.0
    assert end["eval/rewards/accuracy"] == 1.0 and end["eval/rewards/margins"] > 1.0
    assert end["eval/loss"] < 0.5 * math.log(2)
    assert end["eval/rewards/chosen"] > end["eval/rewards/rejected"]
    # The reference stays frozen: its held-out log-probs do not move.
    assert end["eval/ref_logps/chosen"] == pytest.approx(start["eval/ref_logps/chosen"], abs=1e-5)
    curves([tmp_path / "run"], tmp_path / "report")
    plotted = {path.name for path in (tmp_path / "report").glob("*.png")}
    assert {"eval_rewards_margins.png", "eval_rewards_accuracy.png", "rewards_margins.png", "eval_loss.png"} <= plotted


def base_eval_logprobs(model_dir, data) -> tuple:
    """Mean summed answer log-probs of the base model over the held-out pairs the run evaluates on."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, eval_set, _ = prepare_dataset(DataConfig(path=str(data), **DATA), tokenizer, seed=0)
    batch = collate_pairwise([eval_set[i] for i in range(len(eval_set))], tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    answer = labels != -100
    logprobs = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    chosen, rejected = (logprobs * answer).sum(-1).chunk(2)
    return chosen.mean().item(), rejected.mean().item()


@pytest.mark.slow
def test_two_rank_lora_run_uses_the_base_model_with_adapters_disabled_as_reference(tmp_path, tiny_model, pairs):
    # ZeRO-3: the base weights the reference reads are the policy's own, gathered shard by shard.
    metrics = dpo_run(tmp_path, tiny_model, pairs, model={"lora": {"enabled": True, "r": 8, "alpha": 16}},
                      optim={"lr": 2e-2}, engine={"zero_stage": 3})
    evals = [row for row in metrics if "eval/loss" in row]
    base_chosen, base_rejected = base_eval_logprobs(tiny_model, pairs)
    for row in (evals[0], evals[-1]):  # at step 0 and after the adapters have trained
        assert row["eval/ref_logps/chosen"] == pytest.approx(base_chosen, abs=1e-5)
        assert row["eval/ref_logps/rejected"] == pytest.approx(base_rejected, abs=1e-5)
    assert evals[0]["eval/logps/chosen"] == pytest.approx(base_chosen, abs=1e-5)  # zero-initialised adapters
    end = evals[-1]
    assert abs(end["eval/logps/chosen"] - base_chosen) > 0.1  # the adapters did move the policy
    assert end["eval/rewards/accuracy"] == 1.0 and end["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] + 0.5
