"""pipeline.data with the real tiny word-level tokenizer: exact token ids, masks, reports and errors."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import (DataError, DataReport, collate_pairwise, collate_prompts, collate_sft, load_rows,
                           prepare_dataset)
from tests.tiny_models import TINY_WORDS, tiny_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
PAD, UNK, EOS = 0, 1, 3
WORD_ID = {word: index + 4 for index, word in enumerate(TINY_WORDS)}  # after <pad> <unk> <bos> <eos>
# Maps roles to words the tiny vocabulary knows, so rendered chats tokenise without <unk>.
CHAT_TEMPLATE = ("{% for m in messages %}{{ 'human' if m['role'] == 'user' else 'assistant' }} {{ m['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
HH_PROMPT = "\n\nHuman: what is red\n\nAssistant:"


def ids(text: str) -> list:
    """Expected ids for whitespace-separated words; "Human:" / "Assistant:" are <unk> to the tiny vocabulary."""
    return [WORD_ID.get(word, UNK) for word in text.split()]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def prepare(tok, path, seed=0, **fields):
    """Train set in file order: the file is its own eval set unless the test asks for a split."""
    fields.setdefault("eval_path", str(path))
    return prepare_dataset(DataConfig(path=str(path), **fields), tok, seed=seed)


# ---- formats, end to end ---------------------------------------------------------------------------

def test_sft_masks_the_prompt_and_ends_the_response_with_eos(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "what is red", "response": " red is good"}])
    train, _, report = prepare(tokenizer, file)
    # what=32 is=33 red=14 | red=14 is=33 good=26 <eos>=3
    assert train[0]["input_ids"] == [32, 33, 14, 14, 33, 26, 3]
    assert train[0]["labels"] == [-100, -100, -100, 14, 33, 26, 3]
    assert (report.total_rows, report.kept_rows, report.skipped) == (1, 1, {})


def test_sft_takes_chosen_as_the_response_in_rm_static_rows(tokenizer):
    train, _, report = prepare(tokenizer, DATA / "rm_static.jsonl", format="sft", strict=True)
    assert report.kept_rows == 8
    prompt, response = ids(HH_PROMPT), ids("red is good") + [EOS]
    assert prompt == [UNK, 32, 33, 14, UNK]
    assert train[0]["input_ids"] == prompt + response
    assert train[0]["labels"] == [-100] * len(prompt) + response


def test_sft_truncate_cuts_the_prompt_on_the_left_and_the_response_on_the_right(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "what is red", "response": " red is good"}])
    train, _, _ = prepare(tokenizer, file, max_prompt_length=2, max_length=4, truncation="truncate")
    assert train[0]["input_ids"] == [33, 14, 14, 33]  # no eos: the response did not end there
    assert train[0]["labels"] == [-100, -100, 14, 33]


def test_prompt_that_leaves_no_room_masks_every_label_and_is_skipped(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "what is red", "response": " red"},
                                                {"prompt": "what", "response": " red"}])
    # max_prompt_length == max_length passes here because DataConfig is built without load_config's checks.
    train, _, report = prepare(tokenizer, file, max_prompt_length=3, max_length=3, truncation="truncate")
    assert report.skipped == {"all labels masked": [1]}
    assert list(train["input_ids"]) == [[32, 14, EOS]]


def test_pairwise_rows_with_an_explicit_prompt(tokenizer):
    train, _, report = prepare(tokenizer, DATA / "rm_static.jsonl", format="pairwise", strict=True)
    assert report.kept_rows == 8
    assert train[0]["chosen_input_ids"] == ids(HH_PROMPT) + ids("red is good") + [EOS]
    assert train[0]["rejected_input_ids"] == ids(HH_PROMPT) + ids("red is bad") + [EOS]
    assert train[0]["prompt_length"] == len(ids(HH_PROMPT))  # both answers start right after the prompt
    assert train[2]["rejected_input_ids"] == ids("\n\nHuman: is the dog big\n\nAssistant:") + [WORD_ID["no"], EOS]


def test_hh_dialogues_split_at_the_last_assistant_turn(tokenizer):
    file = DATA / "hh_pairs.jsonl"
    pairs, _, _ = prepare(tokenizer, file, format="pairwise", strict=True)
    assert pairs[0]["chosen_input_ids"] == ids(HH_PROMPT + " red is good") + [EOS]
    assert pairs[0]["rejected_input_ids"] == ids(HH_PROMPT + " red is bad") + [EOS]

    prompts, _, _ = prepare(tokenizer, file, format="prompt", strict=True)
    # trl's character-level prefix alone would end at "...Assistant: red is" (both answers begin alike).
    assert prompts[0]["prompt"] == HH_PROMPT
    assert prompts[0]["prompt_input_ids"] == [UNK, 32, 33, 14, UNK]
    two_turns = "\n\nHuman: what is red\n\nAssistant: red is good\n\nHuman: what ran to the park\n\nAssistant:"
    assert prompts[3]["prompt"] == two_turns

    sft, _, _ = prepare(tokenizer, file, format="sft", strict=True)
    assert sft[0]["labels"] == [-100] * 5 + ids("red is good") + [EOS]


def test_prompt_format_keeps_the_text_and_never_appends_eos(tokenizer):
    train, _, _ = prepare(tokenizer, DATA / "rm_static.jsonl", format="prompt", strict=True)
    assert train[0]["prompt_input_ids"] == [UNK, 32, 33, 14, UNK]
    assert train[0]["prompt"] == HH_PROMPT
    cut, _, _ = prepare(tokenizer, DATA / "rm_static.jsonl", format="prompt", max_prompt_length=3,
                        truncation="truncate")
    assert cut[0]["prompt_input_ids"] == [33, 14, UNK]  # the end of the prompt is kept


def test_chat_labels_cover_every_assistant_turn(chat_tokenizer):
    train, _, _ = prepare(chat_tokenizer, DATA / "chat.jsonl", format="chat", strict=True)
    first, second = ids("red is good"), ids("the cat is small") + [EOS]
    assert train[1]["input_ids"] == ids("human what is red assistant") + first + ids(
        "human what is the cat assistant") + second
    assert train[1]["labels"] == [-100] * 5 + first + [-100] * 6 + second
    # sft accepts `messages` rows too, with the same result.
    sft, _, _ = prepare(chat_tokenizer, DATA / "chat.jsonl", format="sft", strict=True)
    assert list(sft["input_ids"]) == list(train["input_ids"])


def test_chat_without_a_template_is_a_data_error(tokenizer):
    with pytest.raises(DataError, match=r"chat\.jsonl.*chat template"):
        prepare(tokenizer, DATA / "chat.jsonl", format="chat")
    with pytest.raises(DataError, match=r"chat\.jsonl: row 1 is a conversation.*chat template"):
        prepare(tokenizer, DATA / "chat.jsonl", format="sft")


def test_conversational_pairs_take_the_shared_messages_as_prompt(chat_tokenizer, tmp_path):
    user = {"role": "user", "content": "what is red"}
    file = write_jsonl(tmp_path / "pairs.jsonl", [{
        "chosen": [user, {"role": "assistant", "content": "red is good"}],
        "rejected": [user, {"role": "assistant", "content": "red is bad"}]}])
    train, _, _ = prepare(chat_tokenizer, file, format="pairwise", strict=True)
    assert train[0]["chosen_input_ids"] == ids("human what is red assistant red is good") + [EOS]
    assert train[0]["rejected_input_ids"] == ids("human what is red assistant red is bad") + [EOS]


@pytest.mark.parametrize("name, fmt, columns", [
    ("rm_static.jsonl", "sft", ["input_ids", "labels"]),
    ("rm_static.jsonl", "pairwise", ["chosen_input_ids", "rejected_input_ids", "prompt_length"]),
    ("rm_static.jsonl", "prompt", ["prompt_input_ids", "prompt", "columns", "source"]),
    ("hh_pairs.jsonl", "pairwise", ["chosen_input_ids", "rejected_input_ids", "prompt_length"]),
    ("chat.jsonl", "chat", ["input_ids", "labels"]),
])
def test_shipped_files_keep_every_row(chat_tokenizer, name, fmt, columns):
    train, eval_set, report = prepare_dataset(DataConfig(path=str(DATA / name), format=fmt, eval_fraction=0.25,
                                                         strict=True), chat_tokenizer, seed=0)
    assert report.kept_rows == report.total_rows == len(train) + len(eval_set)
    assert len(eval_set) == round(report.total_rows * 0.25)
    assert train.column_names == columns
    # Every id is a real word or a special token: the shipped text stays within the tiny vocabulary.
    ids_columns = [column for column in columns if column.endswith("input_ids") or column == "labels"]
    assert max(max(row) for column in ids_columns for row in train[column]) < 4 + len(TINY_WORDS)


# ---- loading ------------------------------------------------------------------------------------------

ROWS = [{"prompt": "what is red", "response": " red"}, {"prompt": "is the dog big", "response": " yes"}]


def test_json_array_json_lines_parquet_and_directories_load_the_same_rows(tokenizer, tmp_path):
    (tmp_path / "array.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    write_jsonl(tmp_path / "lines.json", ROWS)
    write_jsonl(tmp_path / "lines.jsonl", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "table.parquet")
    for name in ("array.json", "lines.json", "lines.jsonl", "table.parquet"):
        assert load_rows(str(tmp_path / name)).to_list() == ROWS, name
    directory = tmp_path / "shards"
    directory.mkdir()
    write_jsonl(directory / "a.jsonl", ROWS[:1])
    pq.write_table(pa.Table.from_pylist(ROWS[1:]), directory / "b.parquet")
    (directory / "notes.txt").write_text("not data")
    assert load_rows(str(directory)).to_list() == ROWS
    train, _, _ = prepare(tokenizer, tmp_path / "table.parquet")
    assert list(train["input_ids"]) == [ids("what is red red") + [EOS], ids("is the dog big yes") + [EOS]]


def test_load_rows_keeps_fields_that_only_later_rows_have(tmp_path):
    file = write_jsonl(tmp_path / "ragged.jsonl", [{"prompt": "a"}, {"prompt": "b", "chosen": "c"}])
    assert load_rows(str(file)).to_list() == [{"prompt": "a", "chosen": None}, {"prompt": "b", "chosen": "c"}]


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, r"missing\.jsonl: file not found"),
    ("empty.jsonl", b"", r"empty\.jsonl: the file is empty"),
    ("broken.jsonl", b'{"prompt": "a"}\n{"prompt": "b",\n', r"broken\.jsonl: malformed JSON on line 2"),
    ("broken.json", b'[{"prompt": "a"},\n {"prompt" "b"}]', r"broken\.json: malformed JSON at line 2"),
    ("latin1.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', r"latin1\.jsonl: not UTF-8 text .*line 2"),
    ("garbage.parquet", b"not parquet at all", r"garbage\.parquet: cannot read it as Parquet"),
    ("numbers.jsonl", b'{"prompt": "a"}\n[1, 2]\n', r"numbers\.jsonl: row 2 is a JSON list"),
    ("no_rows.json", b"[]", r"no_rows\.json: the file holds no rows"),
])
def test_unusable_files_raise_data_errors_naming_the_file(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_rows(str(path))
    with pytest.raises(DataError, match=message):
        prepare_dataset(DataConfig(path=str(path)), tokenizer, seed=0)


# ---- bad rows ---------------------------------------------------------------------------------------------

def bad_rows_file(tmp_path) -> Path:
    good = {"prompt": "what is red", "chosen": " good", "rejected": " bad"}
    lines = [good,
             {"prompt": "what is red", "rejected": " bad"},                       # 2: no chosen
             None,                                                                # 3: blank line
             {"prompt": "what is red", "chosen": 5, "rejected": " bad"},          # 4: wrong type
             {"prompt": "  ", "chosen": " good", "rejected": " bad"},             # 5: empty prompt
             {"prompt": "what is red what is", "chosen": " good", "rejected": " bad"},  # 6: 5 > 4 prompt tokens
             {"prompt": "what", "chosen": " good good good good good", "rejected": " bad"},  # 7: 1 + 6 > 6
             {"prompt": "what is red", "chosen": None, "rejected": " bad"},       # 8: null chosen
             {"prompt": "what", "chosen": " same", "rejected": " same"},          # 9: no preference
             good]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join("\n" if row is None else json.dumps(row) + "\n" for row in lines), encoding="utf-8")
    return path


def test_bad_rows_are_skipped_and_reported_by_row_number(tokenizer, tmp_path):
    train, _, report = prepare(tokenizer, bad_rows_file(tmp_path), format="pairwise", max_prompt_length=4,
                               max_length=6)
    assert report.skipped == {"missing field 'chosen'": [2, 8], "field 'chosen' is not text": [4],
                              "empty field 'prompt'": [5], "prompt over max_prompt_length": [6],
                              "prompt + chosen over max_length": [7], "chosen equals rejected": [9]}
    assert (report.total_rows, report.kept_rows, len(train)) == (9, 2, 2)
    assert report.summary().split("\n")[0] == (
        f"{tmp_path / 'bad.jsonl'}: kept 2 of 9 rows; skipped 2 missing field 'chosen' (rows 2, 8), "
        "1 field 'chosen' is not text (row 4), 1 empty field 'prompt' (row 5), 1 prompt over max_prompt_length "
        "(row 6), 1 prompt + chosen over max_length (row 7), 1 chosen equals rejected (row 9)")


def test_strict_mode_raises_at_the_first_bad_row(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: missing field 'chosen'"):
        prepare(tokenizer, bad_rows_file(tmp_path), format="pairwise", strict=True)


def test_rows_of_a_directory_are_reported_per_file(tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "what", "chosen": " good", "rejected": " bad"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "what", "chosen": " good", "rejected": " bad"},
                                       {"prompt": "what", "rejected": " bad"}])
    _, _, report = prepare_dataset(DataConfig(path=str(tmp_path), format="pairwise"), tokenizer, seed=0)
    assert report.skipped == {"missing field 'chosen' in b.jsonl": [2]}
    assert report.kept_rows == 2


def test_nothing_left_raises_with_the_summary(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "useless.jsonl", [{"prompt": "what"}, {"response": " red"}])
    with pytest.raises(DataError, match=r"useless\.jsonl: kept 0 of 2 rows; skipped 1 missing field 'response' "
                                        r"\(row 1\), 1 missing field 'prompt' \(row 2\)"):
        prepare(tokenizer, file)


def test_summary_shortens_long_row_lists():
    report = DataReport(path="x.jsonl", total_rows=10, kept_rows=3, skipped={"empty field 'prompt'": list(range(1, 8))})
    assert report.summary() == ("x.jsonl: kept 3 of 10 rows; "
                                "skipped 7 empty field 'prompt' (rows 1, 2, 3, 4, 5 and 2 more)")


# ---- train / eval split -------------------------------------------------------------------------------

def test_eval_split_is_fixed_by_the_seed(tokenizer, tmp_path):
    words = TINY_WORDS[:20]
    file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": word} for word in words])

    def split(seed):
        train, eval_set, _ = prepare_dataset(DataConfig(path=str(file), format="prompt", eval_fraction=0.2),
                                             tokenizer, seed=seed)
        return list(train["prompt"]), list(eval_set["prompt"])

    train, eval_set = split(0)
    assert len(eval_set) == 4 and sorted(train + eval_set) == sorted(words)
    assert train == [word for word in words if word not in eval_set]  # file order kept
    assert split(0) == (train, eval_set)
    assert split(1)[1] != eval_set


def test_two_rows_give_one_eval_row_and_eval_path_replaces_the_split(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "two.jsonl", ROWS)
    train, eval_set, _ = prepare_dataset(DataConfig(path=str(file), eval_fraction=0.05), tokenizer, seed=0)
    assert (len(train), len(eval_set)) == (1, 1)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [ROWS[0], {"prompt": "what"}])
    train, eval_set, report = prepare_dataset(DataConfig(path=str(file), eval_path=str(held_out)), tokenizer, seed=0)
    assert (len(train), len(eval_set)) == (2, 1)
    assert report.eval_report.skipped == {"missing field 'response'": [2]}
    assert report.summary().split("\n")[1].startswith(f"{held_out}: kept 1 of 2 rows")


# ---- collators ------------------------------------------------------------------------------------------

def test_collate_sft_right_pads_with_pad_id_and_ignore_index():
    batch = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                        pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_collate_pairwise_puts_all_chosen_rows_before_all_rejected_rows():
    features = [{"chosen_input_ids": [5, 6], "rejected_input_ids": [5, 7, 8]},
                {"chosen_input_ids": [9], "rejected_input_ids": [10, 11]}]
    batch = collate_pairwise(features, pad_token_id=PAD)
    assert batch["input_ids"].shape == (4, 3)
    assert batch["input_ids"].tolist() == [[5, 6, PAD], [9, PAD, PAD], [5, 7, 8], [10, 11, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert "labels" not in batch  # rows without a prompt length: scores only


def test_collate_pairwise_labels_only_the_answers_when_rows_carry_the_prompt_length():
    features = [{"chosen_input_ids": [5, 6], "rejected_input_ids": [5, 7, 8], "prompt_length": 1},
                {"chosen_input_ids": [9, 4], "rejected_input_ids": [9, 10, 11], "prompt_length": 2}]
    labels = collate_pairwise(features, pad_token_id=PAD)["labels"]
    assert labels.tolist() == [[-100, 6, -100], [-100, -100, -100], [-100, 7, 8], [-100, -100, 11]]


def test_collate_prompts_left_pads_and_masks_by_length_even_when_pad_is_eos():
    batch = collate_prompts([{"prompt_input_ids": [5]}, {"prompt_input_ids": [6, 7, EOS]}], pad_token_id=EOS)
    assert batch["input_ids"].tolist() == [[EOS, EOS, 5], [6, 7, EOS]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]  # the real trailing eos stays attended


def test_collators_take_the_rows_prepare_dataset_returns(tokenizer):
    train, _, _ = prepare(tokenizer, DATA / "rm_static.jsonl", format="pairwise")
    batch = collate_pairwise([train[0], train[2]], pad_token_id=tokenizer.pad_token_id)
    lengths = [len(train[0]["chosen_input_ids"]), len(train[2]["chosen_input_ids"]),
               len(train[0]["rejected_input_ids"]), len(train[2]["rejected_input_ids"])]
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
