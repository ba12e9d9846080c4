"""The public RLHF datasets in their own layouts, through the format each stage reads them in: rows kept,
where the prompt ends, which tokens are learned (checked by decoding them) and the order of a pair;
splits, subsets and data files of local snapshots and named datasets; the chat-template built-ins."""
import json
import os
from pathlib import Path

import datasets
import pytest

from pipeline.chat_templates import BUILTIN_TEMPLATES
from pipeline.config import DataConfig
from pipeline.data import DataError, prepare_dataset
from pipeline.math_answers import reference_answer
from tests import public_datasets as public
from tests.public_datasets import assistant, hh, user


@pytest.fixture(scope="module")
def tok():
    return public.byte_tokenizer()


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {"hh-rlhf": public.write_hh_rlhf(root / "hh-rlhf"),
            "hh-rlhf-parquet": public.write_hh_rlhf_parquet(root / "hh-rlhf-parquet"),
            "rm-static": public.write_dahoas(root / "rm-static"),
            "ultrafeedback": public.write_ultrafeedback(root / "ultrafeedback_binarized"),
            "ultrachat": public.write_ultrachat(root / "ultrachat_200k"),
            "trl": public.write_trl_preferences(root / "trl-ultrafeedback"),
            "trl-prompt": public.write_trl_preferences(root / "trl-prompt", explicit_prompt=True),
            "gsm8k": public.write_gsm8k(root / "gsm8k"), "math": public.write_math(root / "MATH-lighteval"),
            "math500": public.write_math500(root / "MATH-500")}


def prepare(tok, path, **fields):
    fields.setdefault("eval_split", "test")
    return prepare_dataset(DataConfig(path=str(path), **fields), tok, seed=0)


def learned(tok, row) -> str:
    """The text of the tokens the SFT loss is taken on."""
    return tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])


def decode(tok, ids) -> str:
    return tok.decode(ids)


# ---- Anthropic/hh-rlhf ----------------------------------------------------------------------------------

def test_hh_rlhf_sft_learns_every_assistant_turn(tok, snapshots):
    train, test, report = prepare(tok, snapshots["hh-rlhf"], data_dir="harmless-base", format="sft")
    assert (report.kept_rows, report.total_rows, len(test)) == (3, 3, 1)
    assert decode(tok, train[1]["input_ids"]) == public.HH_TRAIN[1]["chosen"] + "</s>"
    assert learned(tok, train[1]) == " Hello! How can I help? An apple.</s>"
    assert learned(tok, train[0]) == " The sky is blue.</s>"


def test_hh_rlhf_pairs_split_at_the_last_assistant_turn(tok, snapshots):
    train, _, report = prepare(tok, snapshots["hh-rlhf-parquet"], format="pairwise")
    assert report.skipped == {"chosen equals rejected": [3]}
    prompt = hh("Hi there.", "Hello! How can I help?", "Name a fruit.", "")[:-1]
    assert decode(tok, train[1]["chosen_input_ids"]) == prompt + " An apple.</s>"
    assert decode(tok, train[1]["rejected_input_ids"]) == prompt + " A chair.</s>"
    prompts, _, _ = prepare(tok, snapshots["hh-rlhf-parquet"], format="prompt")
    assert prompts[1]["prompt"] == prompt
    assert decode(tok, prompts[1]["prompt_input_ids"]) == prompt


def test_hh_rlhf_subsets_are_folders_and_their_file_names_give_the_splits(tok, snapshots):
    # Without data_dir both subsets' train files make the split; the report names the file by its folder.
    _, _, report = prepare(tok, snapshots["hh-rlhf"], format="pairwise")
    assert report.total_rows == 4
    assert report.skipped == {f"chosen equals rejected in {Path('harmless-base', 'train.jsonl.gz')}": [3]}
    _, _, helpful = prepare(tok, snapshots["hh-rlhf"], data_dir="helpful-base", format="pairwise")
    assert (helpful.total_rows, helpful.eval_report.total_rows) == (1, 1)


# ---- Dahoas/rm-static, Dahoas/full-hh-rlhf ---------------------------------------------------------------

def test_dahoas_rows_through_each_format(tok, snapshots):
    sft, test, report = prepare(tok, snapshots["rm-static"], format="sft")
    assert (report.kept_rows, len(test)) == (4, 1)
    row = public.DAHOAS_TRAIN[1]
    assert decode(tok, sft[1]["input_ids"]) == row["prompt"] + row["response"] + "</s>"
    assert learned(tok, sft[1]) == " An apple.</s>"  # only the response: the prompt's turns are context

    pairs, _, report = prepare(tok, snapshots["rm-static"], format="pairwise")
    assert report.skipped == {"chosen equals rejected": [3], "empty field 'rejected'": [4]}
    assert decode(tok, pairs[0]["chosen_input_ids"]) == row_text(0, "chosen")
    assert decode(tok, pairs[0]["rejected_input_ids"]) == row_text(0, "rejected")

    prompts, _, report = prepare(tok, snapshots["rm-static"], format="prompt")
    assert report.kept_rows == 4
    assert [p for p in prompts["prompt"]] == [r["prompt"] for r in public.DAHOAS_TRAIN]


def row_text(index: int, side: str) -> str:
    row = public.DAHOAS_TRAIN[index]
    return row["prompt"] + row[side] + "</s>"


# ---- HuggingFaceH4/ultrafeedback_binarized ----------------------------------------------------------------

def test_ultrafeedback_prefs_are_pairs_of_rendered_conversations(tok, snapshots):
    train, test, report = prepare(tok, snapshots["ultrafeedback"], split="train_prefs", eval_split="test_prefs",
                                  format="pairwise", chat_template="chatml")
    assert report.summary() == (
        f"{snapshots['ultrafeedback']} [train_prefs]: kept 2 of 4 rows; skipped 1 chosen equals rejected (row 3), "
        f"1 empty answer in 'chosen' (row 4)\n{snapshots['ultrafeedback']} [test_prefs]: kept 1 of 1 rows")
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tok, train[0]["chosen_input_ids"]) == prompt + "Paris is the capital.<|im_end|>\n</s>"
    assert decode(tok, train[0]["rejected_input_ids"]) == prompt + "London.<|im_end|>\n</s>"
    assert decode(tok, test[0]["chosen_input_ids"]).startswith("<|im_start|>user\nWhat is two plus two?")


def test_ultrafeedback_sft_reads_messages_despite_the_prompt_column(tok, snapshots):
    train, test, report = prepare(tok, snapshots["ultrafeedback"], split="train_sft", eval_split="test_sft",
                                  format="sft", chat_template="llama-2")
    assert report.skipped == {"empty assistant message": [4]}
    assert (report.kept_rows, len(test)) == (3, 1)
    assert decode(tok, train[0]["input_ids"]) == ("<s>[INST] What is the capital of France? [/INST] "
                                                  "Paris is the capital. </s>")
    assert learned(tok, train[0]) == " Paris is the capital. </s>"


def test_ultrafeedback_generation_prompts_go_through_the_template(tok, snapshots):
    prompts, test, report = prepare(tok, snapshots["ultrafeedback"], split="train_gen", eval_split="test_gen",
                                    format="prompt", chat_template="zephyr")
    assert (report.kept_rows, len(test)) == (4, 1)
    assert prompts[0]["prompt"] == "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n"
    assert decode(tok, prompts[0]["prompt_input_ids"]) == prompts[0]["prompt"]


# ---- HuggingFaceH4/ultrachat_200k --------------------------------------------------------------------------

def test_ultrachat_multi_turn_sft_learns_both_assistant_turns(tok, snapshots):
    train, test, report = prepare(tok, snapshots["ultrachat"], split="train_sft", eval_split="test_sft",
                                  format="sft", chat_template="zephyr")
    assert (report.kept_rows, len(test)) == (2, 1)
    assert learned(tok, train[0]) == "Cats are small pets.</s>\nYes, most of the day.</s>\n"
    prompts, _, _ = prepare(tok, snapshots["ultrachat"], split="train_gen", eval_split="test_gen", format="prompt",
                            chat_template="zephyr")
    assert prompts[0]["prompt"] == "<|user|>\nTell me about cats.</s>\n<|assistant|>\n"  # the `prompt` column


# ---- trl-lib/ultrafeedback_binarized (TRL's conversational preferences) --------------------------------------

def test_trl_preferences_with_implicit_and_explicit_prompts(tok, snapshots):
    train, _, report = prepare(tok, snapshots["trl"], format="pairwise", chat_template="chatml")
    assert report.kept_rows == 2
    shared = ("<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHi! Ask away.<|im_end|>\n"
              "<|im_start|>user\nIs the sea salty?<|im_end|>\n<|im_start|>assistant\n")
    assert decode(tok, train[1]["chosen_input_ids"]) == shared + "Yes.<|im_end|>\n</s>"
    assert decode(tok, train[1]["rejected_input_ids"]) == shared + "No.<|im_end|>\n</s>"

    explicit, _, _ = prepare(tok, snapshots["trl-prompt"], format="pairwise", chat_template="chatml")
    assert explicit[0] == train[0]  # the same pair, whether the prompt is its own column or not

    sft, _, _ = prepare(tok, snapshots["trl"], format="sft", chat_template="chatml")
    assert learned(tok, sft[1]) == "Hi! Ask away.<|im_end|>\nYes.<|im_end|>\n</s>"
    prompts, _, _ = prepare(tok, snapshots["trl-prompt"], format="prompt", chat_template="chatml")
    assert prompts[0]["prompt"] == "<|im_start|>user\nWhat is ice?<|im_end|>\n<|im_start|>assistant\n"


# ---- chat templates ----------------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, user("Hi."), assistant("Hello."), user("Bye."),
                assistant("Goodbye.")]
EXPECTED = {
    "llama-2": ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi. [/INST] Hello. </s><s>[INST] Bye. [/INST] Goodbye. </s>",
                " Hello. </s> Goodbye. </s>"),
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"
               "Hello.<|im_end|>\n<|im_start|>user\nBye.<|im_end|>\n<|im_start|>assistant\nGoodbye.<|im_end|>\n</s>",
               "Hello.<|im_end|>\nGoodbye.<|im_end|>\n</s>"),
    "zephyr": ("<|system|>\nBe brief.</s>\n<|user|>\nHi.</s>\n<|assistant|>\nHello.</s>\n<|user|>\nBye.</s>\n"
               "<|assistant|>\nGoodbye.</s>\n", "Hello.</s>\nGoodbye.</s>\n"),
}


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_render_and_mask_exactly_the_assistant_turns(tok, tmp_path, name):
    public.write_parquet(tmp_path / "chat.parquet", [{"messages": CONVERSATION}],
                         public.pa.schema([("messages", public.MESSAGES)]))
    file = str(tmp_path / "chat.parquet")
    train, _, _ = prepare_dataset(DataConfig(path=file, eval_path=file, format="sft", chat_template=name), tok, seed=0)
    text, answers = EXPECTED[name]
    assert decode(tok, train[0]["input_ids"]) == text
    assert learned(tok, train[0]) == answers


def test_the_tokenizer_s_own_template_is_used_and_the_key_overrides_it(snapshots):
    tok = public.byte_tokenizer()
    tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    own, _, _ = prepare(tok, snapshots["trl"], format="sft")
    assert decode(tok, own[0]["input_ids"]).startswith("<|im_start|>user")
    template_file = snapshots["trl"] / "template.jinja"
    template_file.write_text(BUILTIN_TEMPLATES["zephyr"], encoding="utf-8")
    chosen, _, _ = prepare(tok, snapshots["trl"], format="sft", chat_template=str(template_file))
    assert decode(tok, chosen[0]["input_ids"]).startswith("<|user|>\nWhat is ice?</s>")
    assert tok.chat_template == BUILTIN_TEMPLATES["zephyr"]  # the model is saved with what it was trained on


def test_conversations_without_any_template_are_refused_naming_the_key(snapshots):
    with pytest.raises(DataError, match=r"row 1 is a conversation, but the tokenizer has no chat template; "
                                        r"set `data.chat_template` \(a built-in: llama-2, chatml, zephyr"):
        prepare(public.byte_tokenizer(), snapshots["ultrafeedback"], split="train_prefs", eval_split="test_prefs",
                format="pairwise")


# ---- splits, subsets, data files ---------------------------------------------------------------------------

def test_a_snapshot_keeps_its_splits_apart(tok, snapshots):
    train, test, report = prepare(tok, snapshots["rm-static"], format="prompt")
    assert (report.total_rows, report.eval_report.total_rows) == (4, 1)
    assert set(train["prompt"]).isdisjoint(test["prompt"])
    # Without eval_split, eval rows are split off the train split only: the test file stays out.
    train, held_out, report = prepare(tok, snapshots["rm-static"], format="prompt", eval_split=None,
                                      eval_fraction=0.25)
    assert (len(train), len(held_out), report.total_rows) == (3, 1, 4)


def test_unknown_splits_and_subsets_name_the_ones_there_are(tok, snapshots):
    with pytest.raises(DataError, match=r"ultrafeedback_binarized: no split 'train'; it has 'test_gen', 'test_prefs', "
                                        r"'test_sft', 'train_gen', 'train_prefs', 'train_sft'; set `data.split`"):
        prepare(tok, snapshots["ultrafeedback"], eval_split=None, format="pairwise", chat_template="chatml")
    with pytest.raises(DataError, match=r"rm-static: no split 'validation'; it has 'test', 'train'; "
                                        r"set `data.eval_split`"):
        prepare(tok, snapshots["rm-static"], eval_split="validation", format="pairwise")
    with pytest.raises(DataError, match=r"rm-static: no subset 'helpful'; its README.md lists default; "
                                        r"set `data.subset`"):
        prepare(tok, snapshots["rm-static"], subset="helpful", format="pairwise")
    single = snapshots["rm-static"] / "data" / "train-00000-of-00001.parquet"
    with pytest.raises(DataError, match=r"train-00000-of-00001.parquet is one file, which datasets reads as split "
                                        r"'train' only; `data.eval_split` is 'test'"):
        prepare(tok, single, format="pairwise")
    with pytest.raises(DataError, match=r"train-00000-of-00001.parquet is one file; `data.subset` choose files "
                                        r"inside a directory or a named dataset"):
        prepare(tok, single, format="pairwise", eval_split=None, subset="default")


def test_readme_configs_choose_the_subset(tok, tmp_path):
    root = tmp_path / "two-subsets"
    public.write_parquet(root / "easy" / "train.parquet", public.DAHOAS_TRAIN[:1], public.DAHOAS_SCHEMA)
    public.write_parquet(root / "hard" / "train.parquet", public.DAHOAS_TRAIN[:2], public.DAHOAS_SCHEMA)
    public.readme_configs(root, {"easy": {"train": "easy/*.parquet"}, "hard": {"train": "hard/*.parquet"}})
    _, _, report = prepare(tok, root, subset="hard", eval_split=None, format="prompt")
    assert report.total_rows == 2 and report.path == f"{root} [train]"
    with pytest.raises(DataError, match=r"two-subsets: several subsets; its README.md lists easy, hard; "
                                        r"set `data.subset`"):
        prepare(tok, root, eval_split=None, format="prompt")


def test_data_files_pick_the_files_of_each_split(tok, snapshots):
    root = snapshots["ultrafeedback"]
    train, test, report = prepare(tok, root, format="pairwise", chat_template="chatml", eval_split="held_out",
                                  data_files={"train": "data/train_prefs-*.parquet", "held_out": "data/test_prefs-*"})
    assert (report.kept_rows, len(test)) == (2, 1)


def test_a_named_dataset_chooses_its_split(tok, snapshots):
    files = {"train": str(public.shard(snapshots["rm-static"], "train")),
             "test": str(public.shard(snapshots["rm-static"], "test"))}
    train, test, report = prepare(tok, "parquet", data_files=files, format="pairwise")
    assert (report.kept_rows, len(test)) == (2, 1)
    assert report.path == "parquet [train]"
    with pytest.raises(DataError, match=r"parquet: no split 'dev'; it has 'train', 'test'; set `data.eval_split`"):
        prepare(tok, "parquet", data_files=files, format="pairwise", eval_split="dev")


def test_a_named_dataset_loads_offline_from_the_datasets_cache(tok, snapshots, monkeypatch):
    """What a hub download leaves in the datasets cache, loaded by name with the hub switched off."""
    import huggingface_hub
    from datasets.packaged_modules.parquet.parquet import Parquet

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    files = {split: str(public.shard(snapshots["ultrafeedback"], split)) for split in ("train_prefs", "test_prefs")}
    builder = Parquet(dataset_name="ultrafeedback_binarized", config_name="default", hash="0123abcd",
                      data_files=files)
    builder.download_and_prepare()
    named = Path(datasets.config.HF_DATASETS_CACHE) / "mini-rlhf-tests___ultrafeedback_binarized" / "default"
    named.parent.mkdir(parents=True, exist_ok=True)
    os.replace(Path(builder.cache_dir).parents[1], named)  # <owner>___<name>/<config>/<version>/<hash>

    train, test, report = prepare(tok, "mini-rlhf-tests/ultrafeedback_binarized", split="train_prefs",
                                  eval_split="test_prefs", format="pairwise", chat_template="chatml")
    assert (report.kept_rows, report.total_rows, len(test)) == (2, 4, 1)
    assert report.path == "mini-rlhf-tests/ultrafeedback_binarized [train_prefs]"
    with pytest.raises(DataError, match=r"no split 'train_sft'; it has 'train_prefs', 'test_prefs'"):
        prepare(tok, "mini-rlhf-tests/ultrafeedback_binarized", split="train_sft", eval_split=None, format="sft")
    with pytest.raises(DataError, match=r"config 'other'.*Available configs in the cache: \['default'\].*"
                                        r"set `data.subset`"):
        prepare(tok, "mini-rlhf-tests/ultrafeedback_binarized", subset="other", split="train_prefs",
                eval_split=None, format="pairwise", chat_template="chatml")


# ---- openai/gsm8k and MATH: problems asked as user turns, the rows' answers carried ----------------------

def test_gsm8k_questions_are_user_turns_and_their_answers_reach_the_reward_functions(tok, snapshots):
    prompts, test, report = prepare(tok, snapshots["gsm8k"], subset="main", format="prompt", chat_template="chatml")
    assert (report.kept_rows, len(test)) == (4, 1)
    question = public.GSM8K_TRAIN[1]["question"]
    assert prompts[1]["prompt"] == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tok, prompts[1]["prompt_input_ids"]) == prompts[1]["prompt"]
    # The row's own fields travel with it, and where it came from, for the reward functions' messages.
    assert json.loads(prompts[1]["columns"]) == public.GSM8K_TRAIN[1]
    assert prompts[1]["source"] == f"{snapshots['gsm8k'] / 'main' / 'train-00000-of-00001.parquet'} row 2"
    references = [reference_answer(json.loads(row["columns"])) for row in prompts]
    assert references == ["7", "1200", "4.5", "-3"]
    assert reference_answer(json.loads(test[0]["columns"])) == "42"
    with pytest.raises(DataError, match="row 1 is a conversation, but the tokenizer has no chat template; set "
                                        "`data.chat_template`"):
        prepare(public.byte_tokenizer(), snapshots["gsm8k"], subset="main", format="prompt")


def test_math_problems_take_the_boxed_answer_of_the_solution_or_the_answer_column(tok, snapshots):
    prompts, test, _ = prepare(tok, snapshots["math"], format="prompt", chat_template="zephyr")
    assert prompts[0]["prompt"] == f"<|user|>\n{public.MATH_TRAIN[0]['problem']}</s>\n<|assistant|>\n"
    assert [reference_answer(json.loads(row["columns"])) for row in prompts] == ["\\frac{3}{4}", "5"]
    assert reference_answer(json.loads(test[0]["columns"])) == "4"
    prompts, _, _ = prepare(tok, snapshots["math500"], split="test", eval_split="test", format="prompt",
                            chat_template="zephyr")
    columns = json.loads(prompts[0]["columns"])
    assert columns["level"] == 1 and reference_answer(columns) == "9"


# ---- the config keys ---------------------------------------------------------------------------------------

def test_data_keys_are_checked_up_front(tmp_path):
    from pipeline.config import ConfigError, RunConfig, load_config

    file = tmp_path / "run.yaml"
    file.write_text("model: {path: /models/x}\ndata: {path: d, split: test, eval_split: test, chat_template: llama2, "
                    "data_files: {train: 3}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, str(file))
    assert error.value.problems == [
        "`data.eval_split` is 'test', the training split; give a held-out split (e.g. test) or leave it unset to "
        "split off `data.eval_fraction`",
        "`data.data_files.train` is 3; give a file, a glob or a list of them",
        "`data.chat_template` is 'llama2', which is neither a built-in template (llama-2, chatml, zephyr), an "
        "existing template file, nor a Jinja string; did you mean 'llama-2'?"]


def test_the_7b_configs_name_public_datasets_and_their_splits():
    import yaml
    splits = {"Anthropic/hh-rlhf": ("train", "test"), "Dahoas/rm-static": ("train", "test"),
              "Dahoas/full-hh-rlhf": ("train", "test"), "HuggingFaceH4/ultrafeedback_binarized": public.UF_SPLITS,
              "HuggingFaceH4/ultrachat_200k": public.UC_SPLITS, "trl-lib/ultrafeedback_binarized": ("train", "test"),
              "openai/gsm8k": ("train", "test")}
    conversational = {"HuggingFaceH4/ultrafeedback_binarized", "HuggingFaceH4/ultrachat_200k",
                      "trl-lib/ultrafeedback_binarized", "openai/gsm8k"}  # GSM8K's questions become user turns
    for config in sorted(Path(__file__).resolve().parents[2].glob("configs/llama2-7b/*.yaml")):
        data = yaml.safe_load(config.read_text())["data"]
        assert data["path"] in splits, config.name
        assert {data["split"], data["eval_split"]} <= set(splits[data["path"]]), config.name
        assert data["split"] != data["eval_split"], config.name
        # Llama-2 base has no chat template: conversational data must name one.
        assert (data.get("chat_template") in BUILTIN_TEMPLATES) == (data["path"] in conversational), config.name


# ---- bad data ----------------------------------------------------------------------------------------------

def test_a_bad_conversation_row_is_named_by_file_row_and_field(tok, tmp_path):
    rows = [public.UF_TRAIN[0], {**public.UF_TRAIN[1], "rejected": [user("Name a primary colour."),
                                                                    {"content": None, "role": "assistant"}]}]
    path = public.write_parquet(public.shard(tmp_path / "uf", "train_prefs"), rows, public.UF_SCHEMA)
    _, _, report = prepare(tok, tmp_path / "uf", split="train_prefs", eval_split=None, format="pairwise",
                           chat_template="chatml")
    assert report.skipped == {"field 'rejected' is not a list of {role, content} messages": [2]}
    with pytest.raises(DataError, match=rf"^{path}: row 2: field 'rejected' is not a list of \{{role, content\}} "
                                        "messages$"):
        prepare(tok, tmp_path / "uf", split="train_prefs", eval_split=None, format="pairwise", chat_template="chatml",
                strict=True)


def test_a_stage_refuses_a_missing_split_with_exit_code_2_and_no_traceback(tmp_path, snapshots):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, rank_env
    from tests.tiny_models import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")
    config = tmp_path / "sft.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{path: {model}}}\n"
                      f"data: {{path: {snapshots['ultrachat']}, split: train, chat_template: chatml}}\n")
    result = subprocess.run([sys.executable, "-m", "stages.sft", "--config", str(config)], cwd=REPO_ROOT,
                            env=rank_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {snapshots['ultrachat']}: no split 'train'; it has 'test_gen', 'test_sft', 'train_gen', 'train_sft'; "
        "set `data.split`")
    assert "Traceback" not in result.stderr
