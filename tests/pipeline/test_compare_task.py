"""pipeline.compare_task: the gold rule on hand-computed answers, the partial labeler behind the pairs and
its measured disagreement with the gold rule, reproducible files, and configs/compare loading as the
tiny configs do, pointed at the comparison task."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline import compare_task, demo_task
from pipeline.compare_task import gold_reward, gold_reward_batch, labeler_score, read_jsonl, write_compare_data
from pipeline.config import DataConfig, load_config
from pipeline.data import prepare_dataset
from stages.dpo import DpoConfig
from stages.grpo import GrpoConfig
from stages.ppo import PpoConfig
from stages.remax import RemaxConfig
from stages.reward import RewardConfig
from stages.rloo import RlooConfig
from stages.sft import SFTConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "data" / "compare"
CAT = "\n\nHuman: tell me about the cat\n\nAssistant:"
SMALL = dict(n_sft=200, n_pairs=200, n_prompts=50, n_eval_prompts=20)


def file_bytes(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def shipped_rows() -> dict:
    return {key: read_jsonl(SHIPPED / name) for key, name in demo_task.FILES.items()}


# ---- the gold rule: expected values worked out by hand from the docstring's formula ------------------

@pytest.mark.parametrize("response, expected", [
    # 7 words, 3 different positives (0.5), topic (0.25), concise (0.25), no repeats: the top.
    (" the cat is good , great and fun .", 1.0),
    # 4 words, 1 positive: 0.5 / 3 + 0.25 + 0.25.
    (" the cat is good .", 1 / 6 + 0.5),
    # 6 words, 2 negatives: -0.5 * 2 / 3 + 0.25 + 0.25.
    (" the cat is bad and sad .", -1 / 3 + 0.5),
    # good and bad cancel: 0 + 0.25 + 0.25.
    (" the cat is good and bad .", 0.5),
    # 6 words, "good" three times: one distinct positive, two repeats.
    (" the cat is good , good , good .", 1 / 6 + 0.5 - 2 * 0.15),
    # off topic, 6 words, 2 positives: 1 / 3 + concise.
    (" the dog is good and great .", 1 / 3 + 0.25),
    # 1 word: 3 short of four.
    (" good", 1 / 6 - 3 * 0.1),
    # 10 words: 4 different positives capped at 3, topic, 2 past eight, "and" repeated twice.
    (" the cat is good and great and nice and fun .", 0.5 + 0.25 - 2 * 0.1 - 2 * 0.15),
    # 4 words, one distinct negative, three repeats.
    (" bad bad bad bad", -1 / 6 + 0.25 - 3 * 0.15),
    # 10 words, one distinct positive, 2 past eight, 9 repeats: -1.383 clipped at -1.
    (" good good good good good good good good good good", -1.0),
    # no words: punctuation and special tokens do not count.
    ("", -1.0),
    (" . <eos>", -1.0),
])
def test_gold_reward_against_hand_computed_values(response, expected):
    assert gold_reward(CAT, response) == pytest.approx(expected)


def test_gold_reward_ignores_case_special_tokens_and_a_prompt_without_topic():
    assert gold_reward(CAT, " THE Cat is GOOD. <eos> <pad>") == pytest.approx(1 / 6 + 0.5)
    assert gold_reward("\n\nHuman: hello\n\nAssistant:", " the cat is good .") == pytest.approx(1 / 6 + 0.25)


def test_gold_reward_batch_matches_the_scalar_rule_and_checks_lengths():
    prompts, answers = [CAT, CAT, CAT], [" the cat is good .", "", " sad"]
    assert gold_reward_batch(prompts, answers) == [gold_reward(p, a) for p, a in zip(prompts, answers)]
    with pytest.raises(ValueError, match="3 prompts and 2 responses"):
        gold_reward_batch(prompts, answers[:2])


def test_labeler_counts_occurrences_and_sees_nothing_else():
    assert labeler_score(" the cat is good , good , good .") == 3
    assert labeler_score(" the cat is good , great and fun .") == 3
    assert labeler_score(" the dog is bad and great .") == 0
    assert labeler_score(" i hate the cat , it is awful .") == -2
    # The imperfection in one pair: the labeler ties them, the gold rule prefers the varied answer by 1 - 0.367.
    repetitive, varied = " the cat is good , good , good .", " the cat is good , great and fun ."
    assert gold_reward(CAT, varied) - gold_reward(CAT, repetitive) == pytest.approx(1 - (1 / 6 + 0.5 - 2 * 0.15))


# ---- the shipped data -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_compare_data.py"), "--out", str(out),
                    "--seed", "0"], check=True, capture_output=True, cwd=REPO_ROOT)
    return out


def test_shipped_data_equals_a_fresh_run_of_the_script(regenerated):
    fresh, shipped = file_bytes(regenerated), file_bytes(SHIPPED)
    assert sorted(fresh) == sorted(shipped)
    for name in fresh:
        if name.endswith(".jsonl"):
            assert fresh[name] == shipped[name], f"data/compare/{name} drifted; rerun scripts/make_compare_data.py"
    fresh_tok, shipped_tok = (AutoTokenizer.from_pretrained(str(d / "tokenizer")) for d in (regenerated, SHIPPED))
    assert fresh_tok.get_vocab() == shipped_tok.get_vocab()
    assert sum(len(b) for b in shipped.values()) < 1_000_000


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    def generate(name: str, seed: int) -> dict:
        write_compare_data(tmp_path / name, seed=seed, **SMALL)
        return file_bytes(tmp_path / name)

    first, second, other = generate("a", 3), generate("b", 3), generate("c", 4)
    assert first == second
    for name in ("sft.jsonl", "pairs.jsonl", "prompts.jsonl", "eval_prompts.jsonl"):
        assert first[name] != other[name], name


def test_the_demo_data_is_untouched():
    """The comparison task reuses the demo's prompts and split, not its files."""
    rows = {key: read_jsonl(REPO_ROOT / "data" / "demo" / name) for key, name in demo_task.FILES.items()}
    assert rows == demo_task.make_rows(seed=0)


def test_eval_prompts_are_held_out_and_sizes_match():
    rows = shipped_rows()
    assert {k: len(v) for k, v in rows.items()} == {"sft": 2000, "pairs": 2000, "prompts": 500, "eval_prompts": 64}
    eval_prompts = {r["prompt"] for r in rows["eval_prompts"]}
    for key in ("sft", "pairs", "prompts"):
        assert not eval_prompts & {r["prompt"] for r in rows[key]}, key


def test_pairs_follow_the_labeler_and_the_gold_rule_disagrees_on_a_known_share():
    """Every pair's chosen answer has more positive-minus-negative words; the gold rule prefers the
    rejected one on 16.5% of the shipped pairs (ties half): the reward model's blind spot is real."""
    pairs = shipped_rows()["pairs"]
    assert all(labeler_score(r["chosen"]) > labeler_score(r["rejected"]) for r in pairs)
    gold = [(gold_reward(r["prompt"], r["chosen"]), gold_reward(r["prompt"], r["rejected"])) for r in pairs]
    disagreement = sum((c < r) + 0.5 * (c == r) for c, r in gold) / len(gold)
    assert disagreement == pytest.approx(0.165)
    # Some of the disagreements are repetition winning over a varied answer.
    assert any(c < r and len(set(demo_task.words(p["chosen"]))) < len(demo_task.words(p["chosen"]))
               for (c, r), p in zip(gold, pairs))


def test_sft_gold_starts_low_with_headroom_and_answers_end_within_twelve_tokens():
    stats = compare_task.data_stats(shipped_rows())
    assert 0.1 < stats["sft_gold_mean"] < 0.35  # the top is 1.0
    assert 0.2 < stats["sft_repeat_share"] < 0.3
    assert stats["chosen_gold_mean"] > stats["rejected_gold_mean"]
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED / "tokenizer"))
    answers = [tokenizer(r["response"], add_special_tokens=False)["input_ids"] for r in shipped_rows()["sft"]]
    assert max(len(ids) for ids in answers) <= 11  # max_new_tokens is 12: room for the eos
    assert not any(tokenizer.unk_token_id in ids for ids in answers)


def test_make_rows_refuses_bad_sizes():
    with pytest.raises(ValueError, match="the task has 960 distinct prompts"):
        compare_task.make_rows(n_prompts=900, n_eval_prompts=100)
    with pytest.raises(ValueError, match="n_pairs is -1; give 0 or more"):
        compare_task.make_rows(n_pairs=-1)


@pytest.mark.parametrize("name, fmt", [("sft.jsonl", "sft"), ("pairs.jsonl", "pairwise"), ("prompts.jsonl", "prompt")])
def test_files_load_through_prepare_dataset_without_skipped_rows(name, fmt):
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED / "tokenizer"))
    path = str(SHIPPED / name)
    config = DataConfig(path=path, eval_path=path, format=fmt, max_length=40, max_prompt_length=24, strict=True)
    _, _, report = prepare_dataset(config, tokenizer, seed=0)
    assert (report.kept_rows, report.skipped) == (report.total_rows, {})


# ---- configs ------------------------------------------------------------------------------------------------

CONFIGS = {"sft_full": SFTConfig, "reward": RewardConfig, "remax": RemaxConfig, "rloo": RlooConfig,
           "grpo": GrpoConfig, "ppo": PpoConfig, "dpo": DpoConfig}


def pointed_at_compare(value):
    """A tiny config's value with the demo task's paths and gold reward swapped for the comparison task's."""
    if isinstance(value, dict):
        return {k: pointed_at_compare(v) for k, v in value.items()}
    if isinstance(value, str):
        if value == "demo":
            return "compare"
        return value.replace("data/demo", "data/compare").replace("runs/demo", "runs/compare_task")
    return value


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compare_configs_load_and_differ_from_the_tiny_ones_only_in_the_task(name, monkeypatch):
    """Same models and settings as the demo's, on the comparison task's files; the sampling stages run
    120 steps instead of 60, past the gold reward's peak, so over-optimisation shows."""
    monkeypatch.chdir(REPO_ROOT)
    compare = dataclasses.asdict(load_config(CONFIGS[name], f"configs/compare/{name}.yaml"))
    expected = pointed_at_compare(dataclasses.asdict(load_config(CONFIGS[name], f"configs/tiny/{name}.yaml")))
    if name in ("remax", "rloo", "grpo", "ppo"):
        assert (expected["training"]["max_steps"], compare["training"]["max_steps"]) == (60, 120)
        expected["training"]["max_steps"] = 120
    assert compare == expected
    assert compare["data"]["path"].startswith("data/compare/")


def test_eval_policy_config_scores_the_compare_gold():
    import yaml

    compare, tiny = (yaml.safe_load((REPO_ROOT / "configs" / directory / "eval_policy.yaml").read_text())
                     for directory in ("compare", "tiny"))
    assert compare["gold_reward"] == "compare" and compare["prompts_path"] == "data/compare/eval_prompts.jsonl"
    assert compare == pointed_at_compare(tiny)


def test_stages_log_the_compare_gold_reward():
    from pipeline.generation import load_gold_reward
    from pipeline.gold_rewards import GOLD_REWARDS
    from pipeline.rl.rewards import BUILTIN_REWARDS
    from pipeline.rl.sections import GOLD_REWARDS as SECTION_GOLD_REWARDS

    assert SECTION_GOLD_REWARDS == GOLD_REWARDS == ("demo", "compare")
    assert load_gold_reward("compare")([CAT], [" the cat is good , great and fun ."]) == [1.0]
    assert load_gold_reward("demo") is demo_task.gold_reward_batch
    score = BUILTIN_REWARDS["compare_gold"].make({})
    assert score([CAT], [" the cat is good ."], [5], {}) == [pytest.approx(1 / 6 + 0.5)]


@pytest.mark.slow
def test_sft_config_dry_runs_with_a_plan(capsys, monkeypatch):
    """The first stage needs no earlier export: its dry run builds the model from `model.config`."""
    from pipeline.run import run_as_main

    monkeypatch.chdir(REPO_ROOT)
    code = run_as_main("stages.sft", ["--config", "configs/compare/sft_full.yaml", "--dry-run", "--world-size", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "<- chosen" in captured.out
