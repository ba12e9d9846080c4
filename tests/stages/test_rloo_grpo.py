"""RLOO, GRPO and PPO end to end on 2 real DeepSpeed CPU ranks, all in one launch: every metric logged,
the reward rising, the KL moving off zero, the best checkpoint kept (GRPO with two updates per rollout
at ZeRO-3, its frozen models sharded; PPO at ZeRO-2 with its critic's value loss falling); and GRPO on a
GSM8K-layout snapshot rewarded by reward functions alone (configs/tiny/grpo_gsm8k.yaml)."""
import json
import math
import random

import pytest
import yaml

from tests import public_datasets as public
from tests.conftest import REPO_ROOT, launch_ranks
from tests.tiny_models import save_tiny_model_dir, save_tiny_reward_dir, tiny_llama

pytestmark = pytest.mark.slow

STEP_METRICS = ("reward", "advantage_mean", "advantage_std", "kl", "k3_kl", "clip_fraction", "response_length",
                "entropy", "gold_reward", "grad_norm", "lr", "loss")
PPO_STEP_METRICS = ("reward", "kl", "k3_kl", "value_loss", "value_mean", "return_mean", "clip_fraction",
                    "response_length", "entropy", "gold_reward", "grad_norm", "critic_grad_norm", "lr", "loss")
EVAL_METRICS = ("eval/reward", "eval/sampled_reward", "eval/kl", "eval/response_length", "eval/gold_reward")
STEPS = 16


def write_prompts(path, count, seed):
    rng = random.Random(seed)
    words = "the cat sat on a mat dog ran to park red blue big small".split()
    rows = [{"prompt": "human what is " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) + " assistant"}
            for _ in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stage_values(name, root, run_dir, zero_stage, **section):
    return dict(output_dir=str(run_dir), seed=0, model={"path": str(root / "model")},
                data={"path": str(root / "prompts.jsonl"), "format": "prompt", "max_length": 32,
                      "max_prompt_length": 16},
                optim={"lr": 3e-3, "warmup_steps": 1, "betas": [0.9, 0.95], "scheduler": "constant"},
                engine={"zero_stage": zero_stage, "micro_batch_size": 4},
                training={"epochs": 10, "max_steps": STEPS}, logging={"progress_bar": False, "tensorboard": False},
                checkpoint={"every_steps": 8},
                **{name: {"reward_model_path": str(root / "reward"), "eval_prompts_path": str(root / "eval.jsonl"),
                          "max_new_tokens": 6, "eval_every_steps": 8, "gold_reward": "demo", "num_samples": 4,
                          **section}})


LENGTH_WEIGHT = 0.01  # configs/tiny/grpo_gsm8k.yaml's length penalty per token


def gsm8k_values(root, run_dir):
    """configs/tiny/grpo_gsm8k.yaml on a GSM8K-layout snapshot and a tiny policy with a byte-level tokenizer
    (so digits and the chat markers are tokens), the length target at 0: its function is then minus the
    response's token count."""
    tokenizer = public.byte_tokenizer()
    tiny_llama(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, max_position_embeddings=128).save_pretrained(root / "byte_model")
    tokenizer.save_pretrained(root / "byte_model")
    values = yaml.safe_load((REPO_ROOT / "configs/tiny/grpo_gsm8k.yaml").read_text())
    [math_answer, length] = values["reward"]["functions"]
    assert length["weight"] == LENGTH_WEIGHT
    values["reward"]["functions"] = [math_answer, {**length, "args": {"target_tokens": 0}}]
    return {**values, "output_dir": str(run_dir), "model": {"path": str(root / "byte_model")},
            "data": {**values["data"], "path": str(public.write_gsm8k(root / "gsm8k", copies=4)),
                     "cache_dir": str(root / "cache")}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("po_runs")
    save_tiny_reward_dir(root / "reward", save_tiny_model_dir(root / "model"))
    write_prompts(root / "prompts.jsonl", 32, seed=1)
    write_prompts(root / "eval.jsonl", 8, seed=2)
    configs = {"rloo": stage_values("rloo", root, root / "rloo", 2),
               "grpo": stage_values("grpo", root, root / "grpo", 3, updates_per_rollout=2, kl_coef=0.01,
                                    ref_zero_stage=3, reward_zero_stage=3),
               "ppo": stage_values("ppo", root, root / "ppo", 2, kl_coef=0.01, critic_lr=1e-3),
               "grpo_gsm8k": gsm8k_values(root, root / "grpo_gsm8k")}
    args = []
    for name, values in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += [f"stages.{name.split('_')[0]}", path]
    launch_ranks(2, ["tests/stages/po_worker.py", *args])
    return {name: [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            for name in configs} | {"root": root}


@pytest.mark.parametrize("name", ["rloo", "grpo", "ppo"])
def test_two_rank_run_logs_every_metric_and_raises_the_reward(runs, name):
    metrics = runs[name]
    steps = [row for row in metrics if "reward" in row]
    evals = [row for row in metrics if "eval/reward" in row]
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    assert [row["step"] for row in evals] == [0, 8, 16]
    for row in steps:
        for metric in PPO_STEP_METRICS if name == "ppo" else STEP_METRICS:
            assert math.isfinite(row[metric]), (row["step"], metric, row.get(metric))
        assert 1 <= row["response_length"] <= 6 and 0 <= row["clip_fraction"] <= 1
    for row in evals:
        for metric in EVAL_METRICS:
            assert math.isfinite(row[metric]), (row["step"], metric)
    # The first samples come from the reference itself; the policy then moves off it.
    assert abs(steps[0]["kl"]) < 1e-5 and abs(evals[0]["eval/kl"]) < 1e-6 and evals[-1]["eval/kl"] > 0.01
    first, last = [row["reward"] for row in steps[:4]], [row["reward"] for row in steps[-4:]]
    assert sum(last) / 4 > sum(first) / 4 + 0.05, (first, last)
    best = json.loads((runs["root"] / name / "best" / "best.json").read_text())
    assert best["best_eval_reward"] == max(row["eval/reward"] for row in evals)
    assert (runs["root"] / name / "final" / "model.safetensors").exists()


def test_rloo_on_policy_never_clips_and_grpo_reuses_each_rollout_for_two_updates(runs):
    assert all(row["clip_fraction"] == 0.0 for row in runs["rloo"] if "reward" in row)  # ratio 1 exactly
    grpo = [row for row in runs["grpo"] if "reward" in row]
    # Steps 2k-1 and 2k train on one rollout: the same samples, hence the same reward and lengths;
    # on the second update the policy has moved, so the ratio differs from 1.
    for first, second in zip(grpo[::2], grpo[1::2]):
        assert second["reward"] == first["reward"] and second["response_length"] == first["response_length"]
        assert first["clip_fraction"] == 0.0
    assert any(row["clip_fraction"] > 0 for row in grpo[1::2])
    assert grpo[2]["reward"] != grpo[0]["reward"]  # a fresh rollout on step 3


def test_ppo_trains_its_critic_checkpoints_it_with_the_actor_and_exports_it(runs):
    steps = [row for row in runs["ppo"] if "reward" in row]
    first, last = [row["value_loss"] for row in steps[:4]], [row["value_loss"] for row in steps[-4:]]
    assert sum(last) < 0.5 * sum(first), (first, last)
    assert all(row["critic_skipped_steps"] == 0 and row["critic_grad_norm"] > 0 for row in steps)
    # Two updates per rollout: the second one's ratio has moved off 1 (the first's is exactly 1).
    assert all(row["clip_fraction"] == 0.0 for row in steps[::2])
    assert any(row["clip_fraction"] > 0 for row in steps[1::2])
    run_dir = runs["root"] / "ppo"
    assert list((run_dir / "checkpoints" / "step_8" / "critic").glob("*optim_states.pt"))
    assert (run_dir / "critic" / "v_head.safetensors").exists() and (run_dir / "critic" / "reward_model.json").exists()


def test_grpo_on_gsm8k_rewarded_by_functions_alone_logs_each_function_over_both_ranks(runs):
    """No reward model: the reward is math_answer + 0.01 x length, each function's mean logged; the length
    function (minus the tokens each response holds, as the function was told them) agrees with the
    response length the step counts from the masks, on both ranks together."""
    metrics = runs["grpo_gsm8k"]
    steps = [row for row in metrics if "reward" in row]
    evals = [row for row in metrics if "eval/reward" in row]
    assert [row["step"] for row in steps] == [1, 2] and [row["step"] for row in evals] == [0, 2]
    for row, prefix in [(row, "") for row in steps] + [(row, "eval/") for row in evals]:
        answered, length = row[f"{prefix}reward/math_answer"], row[f"{prefix}reward/length"]
        assert 0 <= answered <= 1
        assert length == pytest.approx(-row[f"{prefix}response_length"], abs=1e-9)
        assert row[f"{prefix}reward"] == pytest.approx(answered + LENGTH_WEIGHT * length, abs=1e-5)
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["kl"]) for row in steps)
    assert (runs["root"] / "grpo_gsm8k" / "final" / "model.safetensors").exists()
