"""Local snapshots of the public RLHF datasets, written by the tests: a few rows each, in the column
layout, types, nesting and file names the published datasets have (what `huggingface-cli download`
leaves), and a byte-level BPE tokenizer trained in code on their text so decoding gives the text back.
"""
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])  # the hub's field order
MESSAGES = pa.list_(MESSAGE)


def user(text: str) -> dict:
    return {"content": text, "role": "user"}


def assistant(text: str) -> dict:
    return {"content": text, "role": "assistant"}


def hh(*turns: str) -> str:
    """An HH transcript of alternating human and assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {turn}" for i, turn in enumerate(turns))


def write_parquet(path: Path, rows: list, schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def shard(root: Path, split: str) -> Path:
    return root / "data" / f"{split}-00000-of-00001.parquet"


def readme_configs(root: Path, configs: dict) -> None:
    """A dataset card whose `configs:` YAML maps each config to its split files, as the hub writes it."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {pattern}" for split, pattern in splits.items()]
    (root / "README.md").write_text("\n".join(lines + ["---", "", "A test snapshot."]) + "\n", encoding="utf-8")


# ---- Anthropic/hh-rlhf: chosen / rejected transcripts; the hub's files are <subset>/<split>.jsonl.gz ---------

HH_TRAIN = [
    {"chosen": hh("What colour is the sky?", "The sky is blue."),
     "rejected": hh("What colour is the sky?", "The sky is green.")},
    {"chosen": hh("Hi there.", "Hello! How can I help?", "Name a fruit.", "An apple."),
     "rejected": hh("Hi there.", "Hello! How can I help?", "Name a fruit.", "A chair.")},
    {"chosen": hh("Say yes.", "Yes."), "rejected": hh("Say yes.", "Yes.")},  # no preference
]
HH_TEST = [{"chosen": hh("Is fire hot?", "Yes, fire is hot."), "rejected": hh("Is fire hot?", "No.")}]
HH_SCHEMA = pa.schema([("chosen", pa.string()), ("rejected", pa.string())])


def write_hh_rlhf(root: Path) -> Path:
    for subset, rows in (("harmless-base", HH_TRAIN), ("helpful-base", HH_TRAIN[:1])):
        for split, split_rows in (("train", rows), ("test", HH_TEST)):
            path = root / subset / f"{split}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in split_rows).encode("utf-8")))
    return root


def write_hh_rlhf_parquet(root: Path) -> Path:
    """The hub's parquet conversion of the same data: data/train-*.parquet, data/test-*.parquet."""
    write_parquet(shard(root, "train"), HH_TRAIN, HH_SCHEMA)
    write_parquet(shard(root, "test"), HH_TEST, HH_SCHEMA)
    return root


# ---- Dahoas/rm-static and Dahoas/full-hh-rlhf: prompt, response, chosen, rejected strings ------------------

DAHOAS_SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string()), ("chosen", pa.string()),
                           ("rejected", pa.string())])
DAHOAS_TRAIN = [
    {"prompt": hh("What colour is the sky?", "")[:-1], "response": " The sky is blue.",
     "chosen": " The sky is blue.", "rejected": " The sky is green."},
    {"prompt": hh("Hi there.", "Hello! How can I help?", "Name a fruit.", "")[:-1], "response": " An apple.",
     "chosen": " An apple.", "rejected": " A chair."},
    {"prompt": hh("Say yes.", "")[:-1], "response": " Yes.", "chosen": " Yes.", "rejected": " Yes."},
    {"prompt": hh("Count to two.", "")[:-1], "response": " One, two.", "chosen": " One, two.", "rejected": ""},
]
DAHOAS_TEST = [{"prompt": hh("Is fire hot?", "")[:-1], "response": " Yes, fire is hot.",
                "chosen": " Yes, fire is hot.", "rejected": " No."}]


def write_dahoas(root: Path) -> Path:
    write_parquet(shard(root, "train"), DAHOAS_TRAIN, DAHOAS_SCHEMA)
    write_parquet(shard(root, "test"), DAHOAS_TEST, DAHOAS_SCHEMA)
    readme_configs(root, {"default": {"train": "data/train-*", "test": "data/test-*"}})
    return root


# ---- HuggingFaceH4/ultrafeedback_binarized ----------------------------------------------------------------

UF_SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
                       ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()),
                       ("score_rejected", pa.float64())])
UF_SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")


def uf_row(prompt: str, chosen: str, rejected: str, prompt_id: str) -> dict:
    chosen_messages = [user(prompt), assistant(chosen)]
    return {"prompt": prompt, "prompt_id": prompt_id, "chosen": chosen_messages,
            "rejected": [user(prompt), assistant(rejected)], "messages": chosen_messages,
            "score_chosen": 9.0, "score_rejected": 4.5}


UF_TRAIN = [uf_row("What is the capital of France?", "Paris is the capital.", "London.", "a1"),
            uf_row("Name a primary colour.", "Red is one.", "Purple.", "a2"),
            uf_row("Say hello.", "Hello!", "Hello!", "a3"),  # a tie: both sides the same
            uf_row("Write nothing.", "", "Something.", "a4")]  # an empty chosen answer
UF_TEST = [uf_row("What is two plus two?", "Four.", "Five.", "b1")]


def write_ultrafeedback(root: Path) -> Path:
    for split in UF_SPLITS:
        write_parquet(shard(root, split), UF_TEST if split.startswith("test") else UF_TRAIN, UF_SCHEMA)
    readme_configs(root, {"default": {split: f"data/{split}-*" for split in UF_SPLITS}})
    return root


# ---- HuggingFaceH4/ultrachat_200k -------------------------------------------------------------------------

UC_SCHEMA = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", MESSAGES)])
UC_SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen")
UC_TRAIN = [
    {"prompt": "Tell me about cats.", "prompt_id": "c1",
     "messages": [user("Tell me about cats."), assistant("Cats are small pets."), user("Do they sleep a lot?"),
                  assistant("Yes, most of the day.")]},
    {"prompt": "What is rain?", "prompt_id": "c2",
     "messages": [user("What is rain?"), assistant("Water falling from clouds.")]},
]
UC_TEST = [{"prompt": "Why is snow white?", "prompt_id": "d1",
            "messages": [user("Why is snow white?"), assistant("It scatters all colours of light.")]}]


def write_ultrachat(root: Path) -> Path:
    for split in UC_SPLITS:
        write_parquet(shard(root, split), UC_TEST if split.startswith("test") else UC_TRAIN, UC_SCHEMA)
    readme_configs(root, {"default": {split: f"data/{split}-*" for split in UC_SPLITS}})
    return root


# ---- trl-lib/ultrafeedback_binarized: TRL's conversational preference format --------------------------------

TRL_SCHEMA = pa.schema([("chosen", MESSAGES), ("rejected", MESSAGES), ("score_chosen", pa.float64()),
                        ("score_rejected", pa.float64())])
TRL_TRAIN = [{"chosen": [user("What is ice?"), assistant("Frozen water.")],
              "rejected": [user("What is ice?"), assistant("Hot steam.")], "score_chosen": 8.0, "score_rejected": 2.0},
             {"chosen": [user("Hi."), assistant("Hi! Ask away."), user("Is the sea salty?"), assistant("Yes.")],
              "rejected": [user("Hi."), assistant("Hi! Ask away."), user("Is the sea salty?"), assistant("No.")],
              "score_chosen": 7.0, "score_rejected": 3.0}]
# The explicit-prompt variant: `prompt` is its own message list and the answers hold only the reply.
TRL_PROMPT_SCHEMA = pa.schema([("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES)])
TRL_PROMPT_TRAIN = [{"prompt": [user("What is ice?")], "chosen": [assistant("Frozen water.")],
                     "rejected": [assistant("Hot steam.")]}]


def write_trl_preferences(root: Path, explicit_prompt: bool = False) -> Path:
    rows, schema = (TRL_PROMPT_TRAIN, TRL_PROMPT_SCHEMA) if explicit_prompt else (TRL_TRAIN, TRL_SCHEMA)
    write_parquet(shard(root, "train"), rows, schema)
    write_parquet(shard(root, "test"), rows[:1], schema)
    return root


# ---- openai/gsm8k: question / answer, the answer's last line "#### N"; subsets main and socratic ------------

GSM8K_SCHEMA = pa.schema([("question", pa.string()), ("answer", pa.string())])
GSM8K_TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A book costs $12. How much do 100 books cost?",
     "answer": "100 books cost 100 * 12 = <<100*12=1200>>1200 dollars.\n#### 1200"},
    {"question": "Half of 9 is?", "answer": "Half of 9 is 9 / 2 = <<9/2=4.5>>4.5.\n#### 4.5"},
    {"question": "It is 2 degrees and falls by 5. What is it now?", "answer": "2 - 5 = <<2-5=-3>>-3\n#### -3"},
]
GSM8K_TEST = [{"question": "What is 6 times 7?", "answer": "6 * 7 = <<6*7=42>>42\n#### 42"}]


def write_gsm8k(root: Path, copies: int = 1) -> Path:
    """Each split's rows `copies` times over (a multi-rank run needs a few batches)."""
    for subset in ("main", "socratic"):
        for split, rows in (("train", GSM8K_TRAIN), ("test", GSM8K_TEST)):
            write_parquet(root / subset / f"{split}-00000-of-00001.parquet", rows * copies, GSM8K_SCHEMA)
    readme_configs(root, {subset: {"train": f"{subset}/train-*", "test": f"{subset}/test-*"}
                          for subset in ("main", "socratic")})
    return root


# ---- MATH: DigitalLearningGmbH/MATH-lighteval (problem, level, solution with \boxed{}, type) and
# HuggingFaceH4/MATH-500 (its `answer` column too; one test.jsonl) -------------------------------------------

MATH_SCHEMA = pa.schema([("problem", pa.string()), ("level", pa.string()), ("solution", pa.string()),
                         ("type", pa.string())])
MATH_TRAIN = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
     "solution": "We have $\\frac{1}{2} + \\frac{1}{4} = \\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."},
    {"problem": "Solve $2x = 10$.", "level": "Level 1", "type": "Algebra",
     "solution": "Dividing by 2, $x = \\boxed{5}$."},
]
MATH_TEST = [{"problem": "What is $\\sqrt{16}$?", "level": "Level 1", "type": "Prealgebra",
              "solution": "$\\sqrt{16} = \\boxed{4}$."}]
MATH500 = [{"problem": "What is $3^2$?", "solution": "$3^2 = \\boxed{9}$.", "answer": "9", "subject": "Algebra",
            "level": 1, "unique_id": "test/algebra/1.json"}]


def write_math(root: Path) -> Path:
    write_parquet(shard(root, "train"), MATH_TRAIN, MATH_SCHEMA)
    write_parquet(shard(root, "test"), MATH_TEST, MATH_SCHEMA)
    readme_configs(root, {"default": {"train": "data/train-*", "test": "data/test-*"}})
    return root


def write_math500(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in MATH500), encoding="utf-8")
    return root


# ---- a tokenizer that gives text back --------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def corpus() -> list:
    rows = HH_TRAIN + HH_TEST + DAHOAS_TRAIN + UF_TRAIN + UC_TRAIN + TRL_TRAIN
    texts = [json.dumps(row) for row in rows]
    return texts + ["[INST] [/INST] <<SYS>> <</SYS>> <|user|> <|assistant|> <|system|> Human: Assistant:"]


def byte_tokenizer():
    """Byte-level BPE (as Llama-3 / GPT-2) trained on this module's text, with Llama-2's bos/eos, the
    ChatML markers as special tokens and <pad>; decoding gives the exact text back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
