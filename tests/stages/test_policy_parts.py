"""The parts of RLOO and GRPO on hand-built tensors: the estimators (RLOO's baseline leaves the sample
out, GRPO's zero-variance groups give zero), KL in the reward and as a k3 loss term, the clipped
surrogate loss and its gradient, rollout reuse; and their config checks, by field."""
import math

import pytest
import torch
import yaml

from pipeline.rl.algos import (clipped_surrogate_loss, clipped_value_loss, gae_advantages, grpo_advantage, k3_kl,
                               kl_penalized_sequence_reward, reinforce_loss, rloo_advantage)
from pipeline.rl.rollout import RolloutBuffer, repeat_prompts
from pipeline.run import EXIT_USER_ERROR, main
from stages import grpo, rloo

# ---- estimators ---------------------------------------------------------------------------------


def test_rloo_baseline_is_the_mean_of_the_other_samples_of_the_same_prompt():
    reward = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, -0.5, 1.5])  # 2 prompts x 4 samples
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3,          # group sum 12: (12 - r_i) / 3
                0.5 - 1.5 / 3, 0.5 - 1.5 / 3, -0.5 - 2.5 / 3, 1.5 - 0.5 / 3]  # group sum 2
    assert rloo_advantage(reward, 4).tolist() == pytest.approx(expected, abs=1e-6)
    assert rloo_advantage(torch.tensor([1.0, 3.0]), 2).tolist() == [-2.0, 2.0]  # k = 2: the other sample
    # The sample itself is not in its baseline: raising one reward lowers the others' advantages only
    # through their baselines, by (delta / (k - 1)) each, and raises its own by delta.
    raised = reward.clone()
    raised[0] += 3.0
    delta = rloo_advantage(raised, 4) - rloo_advantage(reward, 4)
    assert delta.tolist() == pytest.approx([3.0, -1.0, -1.0, -1.0, 0, 0, 0, 0], abs=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        rloo_advantage(torch.zeros(6), 4)


def test_grpo_normalises_by_group_mean_and_unbiased_std_and_a_flat_group_gives_zero():
    reward = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.7, 0.7, 0.7, 0.7, 0.1, 0.1, 0.1, 0.1])
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # first group: mean 3, deviations -2, -1, 0, 3
    advantage = grpo_advantage(reward, 4, eps=1e-4)
    assert advantage[:4].tolist() == pytest.approx([d / (std + 1e-4) for d in (-2, -1, 0, 3)], abs=1e-6)
    # Equal rewards: exactly zero, not NaN and not rounding noise (0.1's float mean) divided by eps.
    assert torch.isfinite(advantage).all() and advantage[4:].tolist() == [0.0] * 8
    unscaled = grpo_advantage(reward, 4, scale=False)
    assert unscaled[:4].tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0], abs=1e-6) and unscaled[4:].eq(0).all()
    two = grpo_advantage(torch.tensor([0.0, 1.0]), 2, eps=0.0)  # std of (0, 1) is 1/sqrt(2)
    assert two.tolist() == pytest.approx([-0.5 * math.sqrt(2), 0.5 * math.sqrt(2)], abs=1e-6)


# ---- KL -----------------------------------------------------------------------------------------

def test_kl_in_the_reward_subtracts_the_summed_log_ratio_over_response_tokens():
    reward = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-2.0, -2.0, -2.0]])  # row 0's third token is past its eos
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    penalised = kl_penalized_sequence_reward(reward, logprobs, ref, mask, kl_coef=0.1)
    assert penalised.tolist() == pytest.approx([1.0 - 0.1 * (0.5 - 1.0), 2.0 - 0.1 * 3.0], abs=1e-6)
    assert not penalised.requires_grad  # the penalty shapes the advantage; it is not differentiated


def test_k3_is_exp_minus_linear_minus_one_of_the_reference_log_ratio():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    assert k3_kl(logprobs, ref).tolist()[0] == pytest.approx([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1, 0.0],
                                                              abs=1e-6)


# ---- the clipped surrogate ----------------------------------------------------------------------

def test_clipped_surrogate_matches_a_hand_computation_and_stops_the_gradient_where_clipped():
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.5, 0.5, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    logprobs = (old + ratios.log()).requires_grad_()
    advantage, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss, clipped = clipped_surrogate_loss(logprobs, old, advantage, mask, clip_range=0.2)
    # A = +1: min(1.5, 1.2) = 1.2, min(0.5, 0.8) = 0.5; A = -1: min(-1.5, -1.2) = -1.5, min(-0.5, -0.8) = -0.8.
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4, abs=1e-6)
    assert clipped.tolist() == [[True, False, False], [False, True, False]]
    loss.backward()
    # d/d log pi of -rho A is -rho A; a clipped token and a token past the response give nothing.
    assert logprobs.grad.tolist() == [pytest.approx([0.0, -0.5 / 4, 0.0], abs=1e-6),
                                      pytest.approx([1.5 / 4, 0.0, 0.0], abs=1e-6)]


def test_one_on_policy_update_is_reinforce_with_the_advantage_on_every_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -4.0]], requires_grad=True)
    advantage, mask = torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, clipped = clipped_surrogate_loss(logprobs, logprobs.detach(), advantage, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-(2.0 * 3 - 1.0) / 4) and not clipped.any()  # ratio 1: -mean A
    (grad,) = torch.autograd.grad(loss, logprobs)
    expected = torch.autograd.grad(reinforce_loss(logprobs, advantage[:, None].expand(2, 3), mask), logprobs)[0]
    assert torch.allclose(grad, expected) and grad.tolist()[0] == pytest.approx([-0.5] * 3)


def test_the_k3_loss_term_adds_kl_coef_times_k3_and_pulls_towards_the_reference():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, -2.0]])
    mask, advantage = torch.tensor([[1, 1]]), torch.zeros(1)
    loss, _ = clipped_surrogate_loss(logprobs, logprobs.detach(), advantage, mask, 0.2, ref, kl_coef=0.5)
    assert loss.item() == pytest.approx(0.5 * (math.exp(-1) + 1 - 1 + 0.0) / 2, abs=1e-6)
    loss.backward()
    # d k3 / d log pi = 1 - exp(log pi_ref - log pi): positive where pi > pi_ref, zero where equal.
    assert logprobs.grad.tolist()[0] == pytest.approx([0.5 * (1 - math.exp(-1)) / 2, 0.0], abs=1e-6)


# ---- critic parts ------------------------------------------------------------------------------

def test_gae_matches_a_hand_computation_and_stops_at_each_response_end():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])  # row 1's third token is past its eos
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0: deltas 0.6 - 0.5, 0.7 - 0.6, 1 - 0.7; A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1.
    a1 = 0.1 + 0.95 * 0.3
    # Row 1: V past the response is 0: delta1 = 2 - 0.5, delta0 = 0.5 - 1.
    assert advantages.tolist() == [pytest.approx([0.1 + 0.95 * a1, a1, 0.3], abs=1e-6),
                                   pytest.approx([-0.5 + 0.95 * 1.5, 1.5, 0.0], abs=1e-6)]
    assert returns.tolist() == [pytest.approx([0.5 + 0.1 + 0.95 * a1, 0.6 + a1, 1.0], abs=1e-6),
                                pytest.approx([1.0 - 0.5 + 0.95 * 1.5, 2.0, 0.0], abs=1e-6)]
    # gamma = lam = 1: advantages are rewards-to-go minus the value, returns the rewards-to-go.
    _, to_go = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert to_go.tolist() == [pytest.approx([1.0, 1.0, 1.0]), pytest.approx([2.0, 2.0, 0.0])]


def test_value_loss_takes_the_worse_of_the_clipped_and_unclipped_errors():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, -0.5, 0.1]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    loss = clipped_value_loss(values, old, returns, torch.tensor([[1, 1, 0]]), clip_range=0.2)
    # Token 0: (0.5 - 1)^2 = 0.25 vs clipped (0.2 - 1)^2 = 0.64 -> 0.64; token 1: 2.25 vs 1.44 -> 2.25.
    assert loss.item() == pytest.approx(0.5 * (0.64 + 2.25) / 2, abs=1e-6)
    loss.backward()
    assert values.grad.tolist()[0] == pytest.approx([0.0, 0.5 * 2 * (-1.5) / 2, 0.0], abs=1e-6)


# ---- rollout plumbing ---------------------------------------------------------------------------

def test_prompts_are_repeated_k_times_in_a_row():
    batch = {"input_ids": torch.tensor([[0, 5], [6, 7]]), "attention_mask": torch.tensor([[0, 1], [1, 1]]),
             "prompt": ["a", "b"]}
    repeated = repeat_prompts(batch, 3)
    assert repeated["input_ids"].tolist() == [[0, 5]] * 3 + [[6, 7]] * 3
    assert repeated["attention_mask"].tolist() == [[0, 1]] * 3 + [[1, 1]] * 3
    assert repeated["prompt"] == ["a", "a", "a", "b", "b", "b"]


def test_a_rollout_is_made_on_the_first_of_every_updates_steps_per_accumulation_slot():
    made, keys = [], []
    buffer = RolloutBuffer(updates=2, accumulation=2)

    def make(key):
        made.append(len(made))
        keys.append(key)
        return made[-1]

    got = [buffer.get(make) for _ in range(8)]  # 4 optimizer steps of 2 micro-batches
    assert got == [0, 1, 0, 1, 2, 3, 2, 3]
    # Each rollout is named by its step (the vLLM engine seeds its requests from it and each prompt's row).
    assert keys == [("train", 0), ("train", 0), ("train", 2), ("train", 2)]
    buffer.resume_at(step=2)  # a checkpoint at step 2 falls between rollouts: the next call samples
    assert buffer.get(make) == 4 and keys[-1] == ("train", 2)


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage, override, message", [
    (rloo, "rloo.num_samples=1", "`rloo.num_samples` is 1; the baseline comes from the other samples"),
    (rloo, "rloo.kl_penalty=value", "`rloo.kl_penalty` is 'value'; use one of reward, loss"),
    (rloo, "rloo.ref_zero_stage=2", "`rloo.ref_zero_stage` is 2; use 0 (a full copy per rank) or 3"),
    (rloo, "rloo.max_new_tokens=600", "`rloo.max_new_tokens` 600 exceeds `data.max_length` 512"),
    (grpo, "evaluate.kl_budget=0", "`evaluate.kl_budget` is 0.0; use a positive number of nats, or null for none"),
    (grpo, "grpo.updates_per_rollout=2", "`checkpoint.every_steps` 3 is not a multiple of `grpo.updates_per_rollout` 2"),
    (grpo, "grpo.clip_range=0", "`grpo.clip_range` is 0.0; it must be positive"),
    (grpo, "grpo.std_eps=-1", "`grpo.std_eps` is -1.0; it must be positive"),
    (grpo, "data.format=sft", "`data.format` is 'sft'; grpo generates from prompts"),
])
def test_bad_settings_are_refused_with_one_message_naming_the_field(tmp_path, capsys, stage, override, message):
    name = stage.__name__.rsplit(".", 1)[-1]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"path": "d", "format": "prompt"},
                                      "checkpoint": {"every_steps": 3}, name: {"reward_model_path": "r"}}))
    config_class = stage.RlooConfig if name == "rloo" else stage.GrpoConfig
    code = main(stage.run, config_class, ["--config", str(config), override])
    error = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "Traceback" not in error
    assert message in error and "1 problem(s)" in error


def test_a_missing_reward_model_is_named():
    from pipeline.config import ConfigError, load_config
    with pytest.raises(ConfigError) as error:
        load_config(rloo.RlooConfig, None, ["model.path=m", "data.path=d", "data.format=prompt"])
    assert "`rloo.reward_model_path` is not set" in "\n".join(error.value.problems)
    config = load_config(grpo.GrpoConfig, None, ["model.path=m", "data.path=d", "data.format=prompt",
                                                 "grpo.reward_model_path=r"])
    assert (config.grpo.kl_penalty, config.grpo.num_samples, config.grpo.updates_per_rollout) == ("loss", 4, 1)
