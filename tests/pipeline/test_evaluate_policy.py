"""`python -m pipeline.evaluate policy` on tiny models built in code: a policy against itself, the
greedy reward recomputed by hand, reproducible sampling, the JSON file, and bad configs."""
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from pipeline.config import ConfigError, ModelConfig, load_config
from pipeline.demo_task import gold_reward_batch
from pipeline.evaluate import PolicyEvalConfig, evaluate_policy, main, mean_std, policy_table, win_rate
from pipeline.models import RewardModel, load_causal_lm
from tests.conftest import REPO_ROOT, rank_env
from tests.tiny_models import save_tiny_model_dir, save_tiny_reward_dir, tiny_tokenizer

PROMPTS = ["human what is the cat assistant", "the dog ran to park", "what is red",
           "human say one good thing about the big blue mat assistant", "two three"]
MAX_NEW_TOKENS = 6
SUMMARY_FIELDS = {"reward_mean", "reward_std", "response_length", "missing_eos_fraction", "gold_reward"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny policy, a copy of it in another directory, a different policy, a reward model and prompts."""
    root = tmp_path_factory.mktemp("eval_policy")
    save_tiny_model_dir(root / "policy", seed=1)  # seed 1: some greedy responses end at an eos, some are cut
    shutil.copytree(root / "policy", root / "policy_copy")
    save_tiny_model_dir(root / "other", seed=0)
    save_tiny_reward_dir(root / "reward", root / "policy")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return root


def eval_config(dirs, **overrides) -> PolicyEvalConfig:
    values = dict(policy_path=str(dirs / "policy"), reward_model_path=str(dirs / "reward"),
                  baseline_policy_path=str(dirs / "policy_copy"), prompts_path=str(dirs / "prompts.jsonl"),
                  output=str(dirs / "out" / "eval.json"), max_prompt_length=16, max_new_tokens=MAX_NEW_TOKENS,
                  batch_size=2, num_samples=2, seed=0, device="cpu")
    values.update(overrides)
    return PolicyEvalConfig(**values)


def test_win_rate_counts_ties_half_and_std_is_the_population_one():
    assert win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)


def test_against_itself_the_policy_wins_half_with_zero_kl_and_its_greedy_reward_is_recomputed(dirs):
    config = eval_config(dirs, missing_eos_penalty=1.5, gold_reward="demo")  # reference: the baseline, a copy
    result = evaluate_policy(config)
    assert result["win_rate"] == 0.5  # identical greedy responses: every prompt a tie
    assert result["kl"] == 0.0        # same weights loaded twice: identical log-probs
    assert result["baseline_greedy"] == result["greedy"]
    written = json.loads((dirs / "out" / "eval.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert {"prompts", "samples_per_prompt", "greedy", "sampled", "baseline_greedy", "win_rate", "kl",
            "config"} <= set(written)
    for name in ("greedy", "sampled", "baseline_greedy"):
        assert set(written[name]) == SUMMARY_FIELDS
    assert (written["prompts"], written["samples_per_prompt"]) == (len(PROMPTS), 2)
    assert written["config"]["ref_model_path"] == str(dirs / "policy_copy")

    # By hand: each prompt alone (no padding), greedy, scored unpadded through its first eos.
    tokenizer = tiny_tokenizer()
    policy = load_causal_lm(ModelConfig(path=str(dirs / "policy"))).eval()
    reward_model = RewardModel.from_pretrained(dirs / "reward").eval()
    eos = tokenizer.eos_token_id
    rewards, lengths, cut, texts = [], [], [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            generated = policy.generate(prompt_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, top_k=None,
                                        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            response = generated[0, prompt_ids.shape[1]:].tolist()
            if eos in response:
                response = response[:response.index(eos) + 1]
            reward = reward_model(input_ids=torch.tensor([prompt_ids[0].tolist() + response])).item()
            rewards.append(reward - (1.5 if eos not in response else 0.0))
            lengths.append(len(response))
            cut.append(float(eos not in response))
            texts.append(tokenizer.decode(response, skip_special_tokens=True))
    greedy = result["greedy"]
    assert 0 < sum(cut) < len(cut)  # both kinds of response, so the penalty is tested where it applies and not
    assert greedy["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)
    assert greedy["reward_std"] == pytest.approx(mean_std(rewards)[1], abs=1e-5)
    assert greedy["response_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert greedy["missing_eos_fraction"] == pytest.approx(sum(cut) / len(cut))
    assert greedy["gold_reward"] == pytest.approx(sum(gold_reward_batch(PROMPTS, texts)) / len(PROMPTS))
    assert -1 <= result["sampled"]["gold_reward"] <= 2
    table = policy_table(result)
    assert "| greedy |" in table and "| baseline greedy |" in table and "win rate" in table


def test_sampling_is_reproducible_and_the_kl_to_another_reference_is_not_zero(dirs, tmp_path):
    config = eval_config(dirs, baseline_policy_path=None, ref_model_path=str(dirs / "other"),
                         output=str(tmp_path / "a.json"), temperature=1.5)
    first, second = evaluate_policy(config), evaluate_policy(config)
    strip = lambda result: {k: v for k, v in result.items() if k != "config"}  # noqa: E731
    assert strip(first) == strip(second)
    assert first["kl"] != 0.0 and first["win_rate"] is None and first["baseline_greedy"] is None
    reseeded = evaluate_policy(eval_config(dirs, baseline_policy_path=None, ref_model_path=str(dirs / "other"),
                                           output=str(tmp_path / "b.json"), temperature=1.5, seed=1))
    assert reseeded["sampled"] != first["sampled"]
    assert reseeded["greedy"] == first["greedy"]  # greedy does not depend on the seed
    without_reference = evaluate_policy(eval_config(dirs, baseline_policy_path=None, output=str(tmp_path / "c.json")))
    assert without_reference["kl"] is None and "KL to a reference" in policy_table(without_reference)


def test_config_reports_every_problem_by_field(dirs):
    with pytest.raises(ConfigError) as error:
        load_config(PolicyEvalConfig, None, ["max_new_tokens=0", "top_p=1.5", "gold_reward=oracle",
                                             "precision=fp16", "logits_chunk=-2", f"policy_path={dirs / 'nowhere'}",
                                             f"baseline_policy_path={dirs}", "num_sample=3"])
    problems = "\n".join(error.value.problems)
    for expected in ("`reward_model_path` is not set", "`prompts_path` is not set", "`output` is not set",
                     "`max_new_tokens` is 0", "`top_p` is 1.5", "`logits_chunk` is -2", "`gold_reward` is 'oracle'",
                     "`precision` is 'fp16'",
                     f"`policy_path` {dirs / 'nowhere'} does not exist",
                     f"`baseline_policy_path` {dirs} holds no model (no config.json)",
                     "unknown key `num_sample`; did you mean `num_samples`?"):
        assert expected in problems


def test_a_missing_reward_model_exits_2_naming_the_field_without_a_traceback(dirs, tmp_path, capsys):
    values = dataclasses.asdict(eval_config(dirs))
    config_file = tmp_path / "eval.yaml"
    config_file.write_text(yaml.safe_dump(values))
    # In process: the exit code and the message.
    assert main(["policy", "--config", str(config_file), f"reward_model_path={tmp_path / 'no_rm'}"]) == 2
    assert f"`reward_model_path` {tmp_path / 'no_rm'} does not exist" in capsys.readouterr().err
    # A directory that is a model but not a reward model fails when loading, still by field.
    assert main(["policy", "--config", str(config_file), f"reward_model_path={dirs / 'policy'}"]) == 2
    assert "`reward_model_path`" in capsys.readouterr().err
    # As a command: nothing is loaded, no traceback.
    command = [sys.executable, "-m", "pipeline.evaluate", "policy", "--config", str(config_file),
               f"reward_model_path={tmp_path / 'no_rm'}"]
    finished = subprocess.run(command, cwd=REPO_ROOT, env=rank_env(), capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert "`reward_model_path`" in finished.stderr and "Traceback" not in finished.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (bash scripts/setup.sh --vllm)")
def test_with_vllm_greedy_scores_equal_generates_and_sampling_repeats_with_the_seed(dirs, tmp_path):
    # A baseline that differs from the policy: the engine reads its weights, then the policy's again.
    common = dict(baseline_policy_path=str(dirs / "other"), ref_model_path=str(dirs / "policy_copy"),
                  gold_reward="demo", missing_eos_penalty=1.5)
    hf = evaluate_policy(eval_config(dirs, output=str(tmp_path / "hf.json"), **common))
    first = evaluate_policy(eval_config(dirs, output=str(tmp_path / "a.json"), engine="vllm", **common))
    again = evaluate_policy(eval_config(dirs, output=str(tmp_path / "b.json"), engine="vllm", **common))
    for name in ("greedy", "baseline_greedy"):
        assert first[name] == pytest.approx(hf[name], abs=1e-5), name
    assert first["baseline_greedy"] != first["greedy"] and first["win_rate"] == hf["win_rate"]
    assert first["sampled"] == again["sampled"] and first["kl"] == again["kl"]
