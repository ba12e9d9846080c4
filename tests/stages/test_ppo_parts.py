"""PPO's own parts on hand-built tensors: the critic's per-token values (V(s_t) is the value model's
score of the prompt and the first t response tokens), advantage whitening, the clipped surrogate with
per-token advantages, the wiring of per-token KL-penalised rewards into GAE; and its config checks."""
import pytest
import torch
import yaml

from pipeline.generation import Responses
from pipeline.models import RewardModel
from pipeline.rl.algos import clipped_surrogate_loss, kl_penalized_token_rewards, masked_whiten
from pipeline.run import EXIT_USER_ERROR, main
from stages import ppo
from tests.tiny_models import tiny_llama


def test_per_token_values_are_the_scores_of_each_prefix_and_the_critic_reads_the_state_before_each_token():
    model = RewardModel(tiny_llama(seed=3).model).eval()
    # Two prompts left-padded to P = 4, responses of T = 3 (row 1's last token is padding after its eos).
    sequences = torch.tensor([[0, 11, 12, 13, 20, 21, 22], [0, 0, 14, 15, 23, 24, 0]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        per_token = model(sequences, attention_mask, per_token=True)  # (2, 7)
        assert per_token.shape == (2, 7)
        assert torch.allclose(per_token[[0, 1], [6, 5]], model(sequences, attention_mask), atol=1e-6)
        values = ppo.critic_values(model, Responses(sequences, attention_mask, mask, torch.zeros(2)))
        assert values.shape == (2, 3)
        for t in range(3):  # V(s_t): the prompt and the t response tokens before y_t, scored alone
            for row in range(2):
                if mask[row, t]:
                    prefix = model(sequences[row:row + 1, :4 + t], attention_mask[row:row + 1, :4 + t])
                    assert values[row, t].item() == pytest.approx(prefix.item(), abs=1e-5), (row, t)


def test_whitening_uses_the_response_tokens_only():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    whitened = masked_whiten(values, mask, eps=0.0)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, unbiased std sqrt(2.5)
    expected = (kept - 3) / kept.std()
    assert whitened[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert whitened[0, 2].item() == 0.0
    assert masked_whiten(torch.tensor([[7.0, 1.0]]), torch.tensor([[1, 0]])).tolist() == [[0.0, 0.0]]


def test_the_clipped_surrogate_takes_per_token_advantages():
    logprobs = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.log(torch.tensor([[0.5, 2.0, 1.0]]).reciprocal())  # ratios 0.5, 2, 1
    advantages = torch.tensor([[1.0, 1.0, -3.0]])
    loss, clipped = clipped_surrogate_loss(logprobs, old, advantages, torch.tensor([[1, 1, 1]]), clip_range=0.2)
    # Token 0: min(0.5, 0.8) = 0.5; token 1: min(2, 1.2) = 1.2 (clipped); token 2: ratio 1, -3.
    assert loss.item() == pytest.approx(-(0.5 + 1.2 - 3.0) / 3, abs=1e-6)
    assert clipped.tolist() == [[False, True, False]]
    loss.backward()
    assert logprobs.grad.tolist()[0] == pytest.approx([-0.5 / 3, 0.0, 3.0 / 3], abs=1e-6)  # d(rho A)/d log pi


def test_the_score_lands_on_the_last_response_token_and_gae_turns_kl_penalised_rewards_into_returns():
    old = torch.tensor([[-1.0, -2.0, -1.5], [-0.5, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.5], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    score = torch.tensor([2.0, -1.0])
    rewards = kl_penalized_token_rewards(old, ref, mask, score, 0.1)
    assert rewards.tolist() == [pytest.approx([-0.05, 0.1, 2.0], abs=1e-6), pytest.approx([-0.05, -1.0, 0.0], abs=1e-6)]
    values = torch.tensor([[0.5, 1.0, 1.5], [0.2, -0.4, 7.0]])
    section = ppo.PpoSection(gamma=1.0, lam=1.0, whiten_advantages=False)
    advantages, returns = ppo.ppo_targets(rewards, values, mask, section)
    # gamma = lam = 1: returns are the rewards to go, advantages those minus the value.
    to_go = [[2.05, 2.1, 2.0], [-1.05, -1.0, 0.0]]
    assert returns.tolist() == [pytest.approx(row, abs=1e-6) for row in to_go]
    assert advantages.tolist() == [pytest.approx([1.55, 1.1, 0.5], abs=1e-6), pytest.approx([-1.25, -0.6, 0.0], abs=1e-6)]
    whitened, same_returns = ppo.ppo_targets(rewards, values, mask, ppo.PpoSection(gamma=1.0, lam=1.0))
    assert torch.equal(same_returns, returns)
    assert whitened[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert whitened[mask.bool()].std().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("override, message", [
    ("ppo.critic_init=value", "`ppo.critic_init` is 'value'; use one of reward, policy"),
    ("ppo.lam=1.5", "`ppo.lam` is 1.5; use a value in [0, 1]"),
    ("ppo.value_clip_range=0", "`ppo.value_clip_range` is 0.0; it must be positive"),
    ("ppo.critic_lr=0", "`ppo.critic_lr` is 0.0; it must be positive"),
    ("ppo.num_samples=0", "`ppo.num_samples` is 0; use 1 or more"),
    ("checkpoint.every_steps=3", "`checkpoint.every_steps` 3 is not a multiple of `ppo.updates_per_rollout` 2"),
])
def test_bad_settings_are_refused_with_one_message_naming_the_field(tmp_path, capsys, override, message):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"path": "d", "format": "prompt"},
                                      "checkpoint": {"every_steps": 4}, "ppo": {"reward_model_path": "r"}}))
    code = main(ppo.run, ppo.PpoConfig, ["--config", str(config), override])
    error = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and "Traceback" not in error
    assert message in error and "1 problem(s)" in error
