"""ReMax: the loss math on hand-built tensors, scoring of empty and cut responses, padding
invariance of generation and log-probs, config checks, and a real 2-rank ZeRO-3 run that resumes
to the same numbers."""
import importlib.util
import json
import math
import random
import shutil

import pytest
import torch
import yaml

from pipeline.config import ConfigError, load_config
from pipeline import generation
from pipeline.data import collate_prompts
from pipeline.generation import (generate_responses, generation_configs, missing_eos_penalized, response_logprobs,
                                 response_mask, scored)
from pipeline.models import RewardModel
from pipeline.rl.algos import discounted_returns, kl_penalized_token_rewards, reinforce_loss, remax_advantage
from stages.remax import RemaxConfig
from tests.conftest import launch_ranks, without_timing
from tests.tiny_models import save_tiny_model_dir, save_tiny_reward_dir, tiny_llama, tiny_tokenizer

EOS, PAD = 3, 0


# ---- the math -----------------------------------------------------------------------------------

def test_advantage_is_sample_minus_greedy_reward_clipped_both_ways():
    sample, greedy = torch.tensor([1.0, -9.0, 10.0]), torch.tensor([0.5, 1.0, -1.0])
    assert torch.equal(remax_advantage(sample, greedy, None), torch.tensor([0.5, -10.0, 11.0]))
    assert torch.equal(remax_advantage(sample, greedy, 5.0), torch.tensor([0.5, -5.0, 5.0]))


def test_without_kl_the_rewards_are_the_advantage_at_each_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -0.1], [-1.2, -0.4, -0.9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    advantage = torch.tensor([2.0, -1.0, 0.5])
    rewards = kl_penalized_token_rewards(logprobs, logprobs.clone(), mask, advantage, kl_coef=0.1)
    assert torch.equal(rewards, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -1.0], [0.5, 0.0, 0.0]]))


def test_kl_penalty_is_charged_on_response_tokens_only():
    actor = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -3.0]])  # the third token is past the eos: no charge
    rewards = kl_penalized_token_rewards(actor, ref, torch.tensor([[1, 1, 0]]), torch.tensor([1.0]), kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1 + 1.0, 0.0]]))
    empty = kl_penalized_token_rewards(actor, ref, torch.zeros(1, 3, dtype=torch.long), torch.tensor([1.0]), kl_coef=0.1)
    assert torch.equal(empty, torch.zeros(1, 3))  # no tokens, nothing to credit


def test_returns_are_discounted_rewards_to_go_within_the_response():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    returns = discounted_returns(rewards, mask, gamma=0.5)
    assert torch.allclose(returns, torch.tensor([[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0], [2.0, 2.0, 0.0]]))
    suffix_sums = torch.tensor([[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]])
    assert torch.allclose(discounted_returns(rewards, mask, gamma=1.0), suffix_sums)


def test_reinforce_loss_is_the_token_mean_of_minus_return_times_logprob():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 0.5, 2.0]], requires_grad=True)
    loss = reinforce_loss(logprobs, returns, torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx(-(1.0 * -1.0 + 0.5 * -2.0) / 2)
    loss.backward()
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.5, -0.25, 0.0]]))
    assert returns.grad is None  # returns are constants
    assert reinforce_loss(logprobs, returns, torch.zeros(1, 3)).item() == 0.0


def test_response_mask_keeps_tokens_through_the_first_eos():
    sequences = torch.tensor([[5, 6, 7, EOS, PAD, PAD],   # stops early
                              [5, 6, EOS, PAD, PAD, PAD],  # immediate eos: an empty response of one token
                              [5, 6, 7, 8, 9, 10]])        # hits the length limit
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(response_mask(sequences, 2, EOS, PAD), expected)
    # pad == eos (tokenizers without a pad token): the first eos still ends the response
    padded_with_eos = torch.tensor([[5, 6, 7, EOS, EOS, EOS]])
    assert torch.equal(response_mask(padded_with_eos, 2, EOS, EOS), torch.tensor([[1, 1, 0, 0]]))
    # no eos id: the response ends before generate's padding
    padded = torch.tensor([[5, 6, 7, PAD, PAD, PAD]])
    assert torch.equal(response_mask(padded, 2, None, PAD), torch.tensor([[1, 0, 0, 0]]))


# ---- models -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny Llama with its tokenizer, and a reward model started from it, saved as directories."""
    root = tmp_path_factory.mktemp("remax_models")
    save_tiny_reward_dir(root / "reward", save_tiny_model_dir(root / "model"))
    return root


def prompt_batch(tokenizer, texts):
    rows = [{"prompt_input_ids": tokenizer(text)["input_ids"]} for text in texts]
    return collate_prompts(rows, tokenizer.pad_token_id)


def test_empty_and_cut_responses_get_finite_rewards_read_at_the_eos(tiny_dirs):
    tokenizer = tiny_tokenizer()
    reward_model = RewardModel.from_pretrained(tiny_dirs / "reward").eval()
    batch = prompt_batch(tokenizer, ["human what is the cat assistant", "what is", "the dog ran to park"])
    words = tokenizer.convert_tokens_to_ids(["cat", "sat", "the", "mat"])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    responses = torch.tensor([[eos, pad, pad], [words[0], eos, pad], words[1:]])  # empty, early eos, cut
    sequences = torch.cat([batch["input_ids"], responses], dim=1)
    mask = response_mask(sequences, batch["input_ids"].shape[1], eos, pad)
    attention_mask = torch.cat([batch["attention_mask"], mask], dim=1)
    with torch.no_grad():
        rewards = scored(reward_model, sequences, attention_mask, mask, tokenizer.eos_token_id).reward
        unpadded = tokenizer("human what is the cat assistant")["input_ids"] + [eos]
        alone = reward_model(input_ids=torch.tensor([unpadded]))
        prompt_only = reward_model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1])
    assert torch.isfinite(rewards).all()
    assert mask.sum(-1).tolist() == [1, 2, 3]
    # The empty response is scored at its eos, as if unpadded, and differs from the bare prompt's score.
    assert rewards[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert rewards[0].item() != pytest.approx(prompt_only.item(), abs=1e-6)


def tiny_gpt2(vocab_size):
    """Learned absolute positions: unlike Llama's rotary ones, a shift of every position shows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_left_padding_changes_neither_greedy_responses_nor_their_logprobs(architecture):
    """Positions are counted over real tokens, as generate counts them, so a padded prompt is
    answered and scored as it is alone."""
    tokenizer = tiny_tokenizer()
    build = tiny_gpt2 if architecture == "gpt2" else lambda vocab_size: tiny_llama(seed=3, vocab_size=vocab_size)
    model = build(len(tokenizer)).eval()
    _, greedy_config = generation_configs(tokenizer, max_new_tokens=5)
    texts = ["human what is the big red cat assistant", "what is"]

    def greedy(batch):
        sequences, attention_mask, mask = generate_responses(model, batch, greedy_config, tokenizer)
        logprobs, _ = response_logprobs(model, sequences, attention_mask, mask.shape[1])
        return sequences[:, -mask.shape[1]:], logprobs, mask

    with torch.no_grad():
        padded_tokens, padded_logprobs, padded_mask = greedy(prompt_batch(tokenizer, texts))
        alone_tokens, alone_logprobs, _ = greedy(prompt_batch(tokenizer, texts[1:]))
    assert prompt_batch(tokenizer, texts)["attention_mask"][1, 0] == 0  # the short prompt really is padded
    length = alone_tokens.shape[1]
    assert torch.equal(padded_tokens[1, :length], alone_tokens[0])
    keep = padded_mask[1, :length].bool()
    assert torch.allclose(padded_logprobs[1, :length][keep], alone_logprobs[0][keep], atol=1e-5)


def test_config_reports_every_remax_problem_by_field():
    with pytest.raises(ConfigError) as error:
        load_config(RemaxConfig, None, ["model.path=m", "data.path=d", "remax.kl_coef=-1", "remax.top_p=0",
                                        "remax.ref_offload=true", "remax.gold_reward=oracle",
                                        "remax.max_new_tokens=400"])
    problems = "\n".join(error.value.problems)
    for expected in ("`data.format` is 'sft'", "`remax.reward_model_path` is not set", "`remax.kl_coef` is -1.0",
                     "`remax.top_p` is 0", "`remax.ref_offload` is true with `remax.ref_zero_stage` 0",
                     "`remax.gold_reward` is 'oracle'", "`remax.max_new_tokens` 400 exceeds `data.max_length` 512"):
        assert expected in problems
    config = load_config(RemaxConfig, None, ["model.path=m", "data.path=d", "data.format=prompt",
                                             "remax.reward_model_path=r", "remax.ref_zero_stage=3"])
    assert (config.remax.kl_coef, config.remax.clip_advantage, config.remax.ref_zero_stage) == (0.1, 5.0, 3)


def test_the_old_name_kl_ctl_is_still_read_with_a_message_naming_kl_coef(caplog):
    base = ["model.path=m", "data.path=d", "data.format=prompt", "remax.reward_model_path=r"]
    with caplog.at_level("WARNING", logger="pipeline.config"):
        config = load_config(RemaxConfig, None, [*base, "remax.kl_ctl=0.03"])
    assert config.remax.kl_coef == 0.03
    assert "`remax.kl_ctl` is deprecated: it is now `remax.kl_coef`" in caplog.text
    with pytest.raises(ConfigError) as error:
        load_config(RemaxConfig, None, [*base, "remax.kl_ctl=0.03", "remax.kl_coef=0.1"])
    assert "`remax.kl_ctl` and `remax.kl_coef` are both set" in "\n".join(error.value.problems)


def test_gold_reward_is_skipped_when_its_module_is_absent(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pipeline.demo_task", None)  # import now raises ImportError
    assert generation.load_gold_reward("demo") is None
    assert generation.load_gold_reward(None) is None


# ---- a real run ---------------------------------------------------------------------------------

STEP_METRICS = ("reward", "baseline_reward", "advantage_mean", "advantage_std", "win_rate_vs_greedy", "kl",
                "response_length", "entropy", "grad_norm", "lr", "loss", "tokens_per_s", "step_time")
EVAL_METRICS = ("eval/reward", "eval/sampled_reward", "eval/kl", "eval/response_length")


def write_prompts(path, count, seed):
    rng = random.Random(seed)
    words = "the cat sat on a mat dog ran to park red blue big small".split()
    rows = [{"prompt": "human what is " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + " assistant"}
            for _ in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_rank_zero3_run_logs_every_metric_keeps_the_best_and_resumes_exactly(tiny_dirs, tmp_path):
    run_dir = tmp_path / "run"
    values = dict(output_dir=str(run_dir), seed=0, model={"path": str(tiny_dirs / "model")},
                  data={"path": str(write_prompts(tmp_path / "prompts.jsonl", 12, seed=1)), "format": "prompt",
                        "max_length": 32, "max_prompt_length": 16},
                  optim={"lr": 1e-3, "warmup_steps": 1},
                  engine={"zero_stage": 3, "micro_batch_size": 2},
                  training={"epochs": 2, "max_steps": 4}, logging={"progress_bar": False},
                  checkpoint={"every_steps": 2},
                  remax={"reward_model_path": str(tiny_dirs / "reward"), "max_new_tokens": 6,
                         "eval_prompts_path": str(write_prompts(tmp_path / "eval.jsonl", 4, seed=2)),
                         "eval_every_steps": 2, "ref_zero_stage": 3, "reward_zero_stage": 3, "gold_reward": "demo"})
    config = tmp_path / "remax.yaml"
    config.write_text(yaml.safe_dump(values))
    launch_ranks(2, ["--module", "stages.remax", "--config", config])

    metrics = read_metrics(run_dir)
    gold = importlib.util.find_spec("pipeline.demo_task") is not None
    steps = [row for row in metrics if "reward" in row]
    evals = [row for row in metrics if "eval/reward" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    assert [row["step"] for row in evals] == [0, 2, 4]
    for row in steps:
        for name in STEP_METRICS + (("gold_reward",) if gold else ()):
            assert math.isfinite(row[name]), (row["step"], name, row.get(name))
        assert 0 <= row["win_rate_vs_greedy"] <= 1 and 1 <= row["response_length"] <= 6
        assert 0 < row["optimizer_step_time"] < row["step_time"]
        assert row["advantage_mean"] == pytest.approx(row["reward"] - row["baseline_reward"], abs=1e-5)
    for row in evals:
        for name in EVAL_METRICS + (("eval/gold_reward",) if gold else ()):
            assert math.isfinite(row[name]), (row["step"], name)
    # The first samples come from the reference policy itself; later ones from a policy that moved.
    assert abs(steps[0]["kl"]) < 1e-6 and abs(evals[0]["eval/kl"]) < 1e-6
    assert evals[-1]["eval/kl"] != 0.0
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["best_eval_reward"] == max(row["eval/reward"] for row in evals)
    assert best["best_step"] == max(evals, key=lambda row: row["eval/reward"])["step"]
    assert (run_dir / "best" / "model.safetensors").exists() and (run_dir / "final" / "model.safetensors").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["remax"]["max_new_tokens"] == 6

    # Resumed from the step-2 checkpoint, steps 3-4 repeat exactly (same samples, same updates).
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed_dir)
    assert sorted(p.name for p in (resumed_dir / "checkpoints").glob("step_*")) == ["step_2"]
    launch_ranks(2, ["--module", "stages.remax", "--config", config, f"output_dir={resumed_dir}",
                     "checkpoint.resume=true"])
    assert without_timing(read_metrics(resumed_dir)) == without_timing(metrics)


def test_missing_eos_penalty_hits_only_responses_cut_by_the_limit():
    eos = 3
    responses = torch.tensor([[5, eos, 0], [5, 6, 7], [eos, 0, 0]])  # ended, cut, empty (immediate eos)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    reward = torch.tensor([1.0, 2.0, 0.5])
    assert missing_eos_penalized(reward, responses, mask, eos, 1.5).tolist() == [1.0, 0.5, 0.5]
    assert missing_eos_penalized(reward, responses, mask, eos, None).tolist() == [1.0, 2.0, 0.5]
