"""pipeline.demo_task: the gold rule on hand-written answers, reproducible files, gold-labelled pairs,
the trained tokenizer, and the shipped data/demo loading through pipeline.data."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline import demo_task
from pipeline.config import DataConfig
from pipeline.data import prepare_dataset
from pipeline.demo_task import gold_reward, gold_reward_batch, read_jsonl, write_demo_data

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "data" / "demo"
CAT = "\n\nHuman: tell me about the cat\n\nAssistant:"
SMALL = dict(n_sft=200, n_pairs=200, n_prompts=50, n_eval_prompts=20)  # for the seed tests; the CLI test uses full size


def file_bytes(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    """data/demo as the CLI writes it today, with the defaults the shipped copy was made with."""
    out = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "make_demo_data.py"), "--out", str(out), "--seed", "0"],
                   check=True, capture_output=True, cwd=REPO_ROOT)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(SHIPPED / "tokenizer"))


# ---- the gold rule ----------------------------------------------------------------------------------

def test_gold_reward_orders_positive_neutral_negative_and_counts_the_topic():
    positive, neutral, negative = (gold_reward(CAT, f" the cat is {w} .") for w in ("good", "quiet", "bad"))
    assert (positive, neutral, negative) == pytest.approx((0.25 + 0.3, 0.3, -0.25 + 0.3))
    assert gold_reward(CAT, " the dog is good .") == pytest.approx(0.25)  # off topic: no bonus
    assert gold_reward(CAT, " it is good and happy .") == pytest.approx(2 / 5)
    assert gold_reward("\n\nHuman: hello\n\nAssistant:", " the cat is good .") == pytest.approx(0.25)  # no topic asked


def test_gold_reward_of_empty_short_long_and_repeated_answers():
    assert gold_reward(CAT, "") == -1.0
    assert gold_reward(CAT, " . <eos>") == -1.0  # no words: punctuation and special tokens do not count
    assert gold_reward(CAT, " good") == pytest.approx(1.0 - 2 * 0.25)  # two words short of three
    long_answer = " the cat is good and the cat is good and nice"  # 11 words: 3 past eight
    assert gold_reward(CAT, long_answer) == pytest.approx(3 / 11 + 0.3 - 3 * 0.25)  # good, good, nice
    assert gold_reward(CAT, " the cat good good good") == pytest.approx(3 / 5 + 0.3)  # every occurrence counts
    assert gold_reward(CAT, " the cat is good . <eos> <pad>") == gold_reward(CAT, " the cat is good .")
    assert gold_reward(CAT, " THE Cat is GOOD.") == gold_reward(CAT, " the cat is good .")
    assert gold_reward(CAT, " bad " * 200) == -1.0  # clipped at the bottom of the range
    assert math.isfinite(gold_reward("", ""))


def test_gold_reward_batch_matches_the_scalar_rule_and_checks_lengths():
    prompts, answers = [CAT, CAT, CAT], [" the cat is good .", "", " sad"]
    assert gold_reward_batch(prompts, answers) == [gold_reward(p, a) for p, a in zip(prompts, answers)]
    with pytest.raises(ValueError, match="3 prompts and 2 responses"):
        gold_reward_batch(prompts, answers[:2])


# ---- generation ------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    def generate(name: str, seed: int) -> dict:
        write_demo_data(tmp_path / name, seed=seed, **SMALL)
        return file_bytes(tmp_path / name)

    first, second, other = generate("a", 3), generate("b", 3), generate("c", 4)
    assert set(first) == {"sft.jsonl", "pairs.jsonl", "prompts.jsonl", "eval_prompts.jsonl",
                          "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    assert first == second
    for name in ("sft.jsonl", "pairs.jsonl", "prompts.jsonl", "eval_prompts.jsonl"):
        assert first[name] != other[name], name


def test_shipped_data_equals_a_fresh_run_of_the_script(regenerated):
    fresh, shipped = file_bytes(regenerated), file_bytes(SHIPPED)
    assert sorted(fresh) == sorted(shipped)
    for name in fresh:
        if name.endswith(".jsonl"):
            assert fresh[name] == shipped[name], f"data/demo/{name} drifted; rerun scripts/make_demo_data.py"
    # Tokenizer files are compared by content: their layout depends on the transformers version.
    fresh_tok, shipped_tok = (AutoTokenizer.from_pretrained(str(d / "tokenizer")) for d in (regenerated, SHIPPED))
    assert fresh_tok.get_vocab() == shipped_tok.get_vocab()
    assert sum(len(b) for b in shipped.values()) < 1_000_000


def test_row_counts_and_eval_prompts_disjoint_from_every_other_file():
    rows = {key: read_jsonl(SHIPPED / name) for key, name in demo_task.FILES.items()}
    assert {k: len(v) for k, v in rows.items()} == {"sft": 2000, "pairs": 2000, "prompts": 500, "eval_prompts": 64}
    eval_prompts = {r["prompt"] for r in rows["eval_prompts"]}
    assert len(eval_prompts) == 64
    assert len({r["prompt"] for r in rows["prompts"]}) == 500
    for key in ("sft", "pairs", "prompts"):
        assert not eval_prompts & {r["prompt"] for r in rows[key]}, key
    assert {demo_task.prompt_topic(p) for p in eval_prompts} == set(demo_task.TOPICS)


def test_pairs_are_labelled_by_the_gold_rule_with_a_clear_margin():
    pairs = read_jsonl(SHIPPED / "pairs.jsonl")
    margins = [gold_reward(r["prompt"], r["chosen"]) - gold_reward(r["prompt"], r["rejected"]) for r in pairs]
    assert min(margins) >= demo_task.MIN_PAIR_MARGIN - 1e-9


def test_sft_gold_is_moderate_and_the_pairs_are_learnable():
    """The SFT data leaves RL room to climb (best possible is 1.175), and a word-count scorer already
    ranks most pairs right, so the reward model's task is learnable."""
    rows = {key: read_jsonl(SHIPPED / name) for key, name in demo_task.FILES.items()}
    stats = demo_task.data_stats(rows)
    assert 0.1 < stats["sft_gold_mean"] < 0.4
    # Pairs that differ in degree (one positive word more) are harder than pairs of opposite sign:
    # measured 0.364 mean margin, 0.888 word-count and 0.972 lexical scorer accuracy.
    assert stats["chosen_gold_mean"] - stats["rejected_gold_mean"] > 0.3
    assert stats["count_scorer_accuracy"] > 0.85
    assert stats["lexical_scorer_accuracy"] > 0.95
    lengths = {len(demo_task.words(r["response"])) for r in rows["sft"]}
    assert min(lengths) >= 3 and max(lengths) <= 8


def test_make_rows_refuses_more_prompts_than_the_task_has():
    with pytest.raises(ValueError, match="the task has 960 distinct prompts"):
        demo_task.make_rows(n_prompts=900, n_eval_prompts=100)


# ---- tokenizer and pipeline.data -----------------------------------------------------------------------

def test_tokenizer_loads_with_special_tokens_and_round_trips_answers(tokenizer):
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<pad>", "<eos>", "<bos>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 3, 2)
    for row in read_jsonl(SHIPPED / "sft.jsonl")[:200]:
        ids = tokenizer(row["prompt"] + row["response"])["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        answer_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(answer_ids) == row["response"].strip()
    prompt_tokens = tokenizer.convert_ids_to_tokens(tokenizer(CAT)["input_ids"])
    assert prompt_tokens == ["<bos>", "Human:", "tell", "me", "about", "the", "cat", "Assistant:"]
    # Every word the gold rule scores can be said.
    every_word = " ".join(demo_task.POSITIVE + demo_task.NEGATIVE + demo_task.TOPICS)
    assert tokenizer.unk_token_id not in tokenizer(every_word)["input_ids"]


@pytest.mark.parametrize("name, fmt, columns", [
    ("sft.jsonl", "sft", {"input_ids", "labels"}),
    ("pairs.jsonl", "pairwise", {"chosen_input_ids", "rejected_input_ids", "prompt_length"}),
    ("prompts.jsonl", "prompt", {"prompt_input_ids", "prompt", "columns", "source"}),
    ("eval_prompts.jsonl", "prompt", {"prompt_input_ids", "prompt", "columns", "source"}),
])
def test_files_load_through_prepare_dataset_without_skipped_rows(tokenizer, name, fmt, columns):
    path = str(SHIPPED / name)
    config = DataConfig(path=path, eval_path=path, format=fmt, max_length=32, max_prompt_length=16, strict=True)
    train, _, report = prepare_dataset(config, tokenizer, seed=0)
    assert (report.kept_rows, report.skipped) == (report.total_rows, {})
    assert set(train.column_names) == columns
    if fmt == "sft":  # the answer, and only the answer, is learned, ending in eos
        row = train[0]
        answer = [t for t in row["labels"] if t != -100]
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]) == read_jsonl(path)[0]["response"].strip()
