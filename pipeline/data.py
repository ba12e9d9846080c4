"""Rows in, token ids out: loading, validation and tokenisation shared by the SFT, reward, ReMax and DPO stages.

    train, eval, report = prepare_dataset(config.data, tokenizer, seed=config.seed)
    print(report.summary())  # "data/train.jsonl: kept 97 of 100 rows; skipped 3 missing field 'chosen' (rows 4, 9, 17)"
    batch = collate_sft([train[i] for i in range(8)], tokenizer.pad_token_id)

Formats (`data.format`) and the columns each produces, unpadded:

    sft      prompt + response | prompt + chosen (rm-static) | HH dialogue | messages  -> input_ids, labels
    chat     messages, rendered with the tokenizer's chat template               -> input_ids, labels
    pairwise prompt + chosen + rejected | HH dialogues sharing a prefix          -> chosen_input_ids,
                                                                                    rejected_input_ids, prompt_length
    prompt   prompt | messages | HH dialogue                                     -> prompt_input_ids, prompt

(`prompt` is the text as given, or as rendered by the chat template, even where its ids were cut.)

Prompt and answer are joined as they are (rm-static answers start with a space) and tokenised
together; the answer starts where that sequence leaves the tokenised prompt
(`trl.data_utils.common_prefix_length`), as TRL's SFT and DPO trainers do, so tokens merging
across the boundary never shift the loss mask. Plain text gets the tokenizer's special tokens
(BOS); chat-rendered text does not, since the template writes them itself.

Rows are numbered from 1 as in their file: the line number in JSON lines, the item number
in a JSON array, Parquet file or named dataset. Bad rows are skipped and counted in a
`DataReport`, or raise `DataError` with `data.strict`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Optional

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from trl.data_utils import apply_chat_template, common_prefix_length, extract_prompt, maybe_extract_prompt
from trl.trainer.utils import pad

from .config import DataConfig

SUFFIXES = (".json", ".jsonl", ".parquet")
FORMATS = ("sft", "pairwise", "prompt", "chat")
IGNORE_INDEX = -100  # labels the loss skips (torch cross_entropy's default ignore_index)
HH_ASSISTANT = "\n\nAssistant:"  # Anthropic HH / rm-static turn marker; the prompt ends with the last one


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and the row, 1-based, where one is at fault)."""


class _BadRow(Exception):
    """One row that cannot be used. `reason` is the short key it is counted under in the report."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


class _NoChatTemplate(Exception):
    """A conversational row met a tokenizer without a chat template: a setup error, not a bad row."""


class _Row(NamedTuple):
    file: str    # the file it came from (or the dataset name)
    number: int  # 1-based, as in the file
    values: dict


# ---- the report -----------------------------------------------------------------------------------

def _row_list(numbers: list, shown: int = 5) -> str:
    head = ", ".join(str(n) for n in numbers[:shown])
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"row{'s' if len(numbers) > 1 else ''} {head}{more}"


@dataclasses.dataclass
class DataReport:
    """What happened to one data file's rows; `eval_report` covers `data.eval_path` when one is given."""

    path: str
    total_rows: int
    kept_rows: int
    skipped: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # reason -> 1-based row numbers
    eval_report: Optional["DataReport"] = None

    def summary(self) -> str:
        """One line per file (the eval file's on a second line), e.g.
        "train.jsonl: kept 97 of 100 rows; skipped 3 missing field 'chosen' (rows 4, 9, 17)"."""
        line = f"{self.path}: kept {self.kept_rows} of {self.total_rows} rows"
        if self.skipped:
            parts = [f"{len(rows)} {reason} ({_row_list(rows)})" for reason, rows in self.skipped.items()]
            line += "; skipped " + ", ".join(parts)
        if self.eval_report is not None:
            line += "\n" + self.eval_report.summary()
        return line


# ---- reading files ----------------------------------------------------------------------------------

def _read_text(file: Path) -> str:
    try:
        data = file.read_bytes()
    except OSError as error:
        raise DataError(f"{file}: cannot read the file: {error.strerror or error}") from None
    if not data.strip():
        raise DataError(f"{file}: the file is empty")
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DataError(f"{file}: not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
                        "re-save the file as UTF-8") from None


def _read_json(file: Path) -> list:
    """(row number, value) pairs from a JSON array or JSON lines, whatever the suffix says."""
    text = _read_text(file)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}: malformed JSON at line {error.lineno}, column {error.colno}: "
                            f"{error.msg}") from None
        return list(enumerate(items, 1))
    numbered = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks on.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            numbered.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            try:  # one pretty-printed object is a file of one row
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if isinstance(whole, dict):
                return [(1, whole)]
            raise DataError(f"{file}: malformed JSON on line {number}, column {error.colno}: {error.msg}") from None
    return numbered


def _read_file(file: Path) -> list:
    if file.suffix == ".parquet":
        if file.is_file() and file.stat().st_size == 0:
            raise DataError(f"{file}: the file is empty")
        try:
            numbered = list(enumerate(pq.read_table(file).to_pylist(), 1))
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"{file}: cannot read it as Parquet: {error}") from None
    else:
        numbered = _read_json(file)
    for number, values in numbered:
        if not isinstance(values, dict):
            raise DataError(f"{file}: row {number} is a JSON {type(values).__name__}, expected an object "
                            "with named fields")
    if not numbered:
        raise DataError(f"{file}: the file holds no rows")
    return [_Row(str(file), number, values) for number, values in numbered]


def _local_files(path: str) -> Optional[list]:
    """The data files `path` names, or None when it names no local file (a dataset name, then)."""
    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(f for f in local.iterdir() if f.suffix in SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{path}: the directory holds no {', '.join(SUFFIXES)} files")
        return files
    if local.exists() or local.suffix in SUFFIXES or path.startswith((".", "/", "~")):
        if not local.exists():
            raise DataError(f"{path}: file not found")
        if local.suffix not in SUFFIXES:
            raise DataError(f"{path}: unknown file type {local.suffix!r}; use {', '.join(SUFFIXES)}")
        return [local]
    return None


def _load_named(name: str) -> Dataset:
    try:
        return datasets.load_dataset(name, split="train")
    except Exception as error:  # the hub client raises many types; the user needs the name and the cause
        raise DataError(f"{name}: not a local file or directory, and datasets.load_dataset could not load it "
                        f"as a dataset name: {type(error).__name__}: {error}") from None


def _read_rows(path: str, files: Optional[list]) -> list:
    if files is None:
        return [_Row(path, number, dict(values)) for number, values in enumerate(_load_named(path), 1)]
    return [row for file in files for row in _read_file(file)]


def load_rows(path: str) -> Dataset:
    """Reads a `.json` (array or JSON lines), `.jsonl` or `.parquet` file, a directory of them, or a
    dataset name for `datasets.load_dataset` (split "train").

    JSON is parsed here rather than by `datasets` so that errors carry line numbers.

    Raises:
        DataError: naming the file, for a missing, empty, unreadable, non-UTF-8 or malformed file
            (with the line where the parser gives one), or rows that do not form one table.
    """
    files = _local_files(path)
    if files is None:
        return _load_named(path)
    rows = _read_rows(path, files)
    names = list(dict.fromkeys(key for row in rows for key in row.values))  # union, first-seen order
    try:
        return Dataset.from_dict({name: [row.values.get(name) for row in rows] for name in names})
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise DataError(f"{path}: the rows do not form one table (a field holds different types in "
                        f"different rows?): {error}") from None


# ---- rows to texts ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Texts:
    prompt: str
    answers: tuple  # sft/chat: (response,); pairwise: (chosen, rejected); prompt: ()
    chat: bool      # rendered by a chat template, which writes its own special tokens


def _text(values: dict, field: str) -> str:
    value = values.get(field)
    if value is None:
        raise _BadRow(f"missing field '{field}'")
    if not isinstance(value, str):
        raise _BadRow(f"field '{field}' is not text", f"it holds a {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"empty field '{field}'")
    return value


def _messages(values: dict, field: str) -> list:
    value = values.get(field)
    if value is None:
        raise _BadRow(f"missing field '{field}'")
    if not (isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)):
        raise _BadRow(f"field '{field}' is not a list of {{role, content}} messages")
    return value


def _render(example: dict, tokenizer) -> dict:
    """`trl.data_utils.apply_chat_template` (prompt with the generation prompt, answers as the rest)."""
    if not getattr(tokenizer, "chat_template", None):
        raise _NoChatTemplate()
    try:
        return apply_chat_template(example, tokenizer)
    except Exception as error:  # templates are user code (raise_exception, bad roles): a bad row, not a crash
        raise _BadRow("chat template failed", f"{type(error).__name__}: {error}") from None


def _split_hh(chosen: str, rejected: Optional[str]) -> tuple:
    """(prompt, chosen answer, rejected answer or None) from HH dialogues holding the prompt themselves."""
    if rejected is None:
        cut = chosen.rfind(HH_ASSISTANT)
        if cut < 0:
            raise _BadRow("missing field 'prompt'", f"and no {HH_ASSISTANT!r} turn in 'chosen' to take it from")
        cut += len(HH_ASSISTANT)
        return chosen[:cut], chosen[cut:], None
    if chosen == rejected:
        raise _BadRow("chosen equals rejected")
    prompt = extract_prompt({"chosen": chosen, "rejected": rejected})["prompt"]
    # trl cuts at the first differing character, inside the answer when both answers begin alike
    # ("red is good" / "red is bad"); the prompt really ends at the last assistant marker.
    marker = prompt.rfind(HH_ASSISTANT)
    if marker >= 0:
        prompt = prompt[:marker + len(HH_ASSISTANT)]
    if not prompt.strip():
        raise _BadRow("chosen and rejected share no prompt")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def _hh_chosen(values: dict) -> tuple:
    """(prompt, chosen answer) of an HH row without a prompt field, for SFT and generation prompts;
    a differing `rejected` helps find the prompt where the dialogue has no assistant marker."""
    chosen = _text(values, "chosen")
    rejected = values.get("rejected")
    usable = isinstance(rejected, str) and rejected.strip() and rejected != chosen
    prompt, answer, _ = _split_hh(chosen, rejected if usable else None)
    return prompt, answer


def _check_answers(names: tuple, answers: tuple) -> None:
    for name, answer in zip(names, answers):
        if not answer.strip():
            raise _BadRow(f"empty field '{name}'")


def _chat_texts(values: dict, tokenizer, field: str = "messages") -> _Texts:
    messages = _messages(values, field)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise _BadRow("no assistant message")
    if last == 0:
        raise _BadRow("no message before the assistant message")
    if not messages[last]["content"].strip():
        raise _BadRow("empty assistant message")
    rendered = _render({"prompt": messages[:last], "completion": [messages[last]]}, tokenizer)
    return _Texts(rendered["prompt"], (rendered["completion"],), chat=True)


def _sft_texts(values: dict, tokenizer) -> _Texts:
    if values.get("prompt") is None and values.get("messages") is not None:
        return _chat_texts(values, tokenizer)
    if values.get("prompt") is None and isinstance(values.get("chosen"), list):  # conversational HH
        return _chat_texts(values, tokenizer, "chosen")
    if values.get("prompt") is None and values.get("chosen") is not None:
        prompt, response = _hh_chosen(values)
        _check_answers(("chosen",), (response,))
        return _Texts(prompt, (response,), chat=False)
    prompt = _text(values, "prompt")
    field = next((f for f in ("response", "completion", "chosen") if values.get(f) is not None), "response")
    return _Texts(prompt, (_text(values, field),), chat=False)


def _pairwise_texts(values: dict, tokenizer) -> _Texts:
    if isinstance(values.get("chosen"), list) or isinstance(values.get("rejected"), list):
        example = {"chosen": _messages(values, "chosen"), "rejected": _messages(values, "rejected")}
        if values.get("prompt") is not None:
            example["prompt"] = values["prompt"]
        example = maybe_extract_prompt(example)  # implicit prompt: the shared leading messages
        if not example["prompt"]:
            raise _BadRow("chosen and rejected share no prompt")
        rendered = _render(example, tokenizer)
        answers, chat = (rendered["chosen"], rendered["rejected"]), True
        prompt = rendered["prompt"]
    elif values.get("prompt") is None:
        prompt, *answers = _split_hh(_text(values, "chosen"), _text(values, "rejected"))
        chat = False
    else:
        prompt, answers = _text(values, "prompt"), (_text(values, "chosen"), _text(values, "rejected"))
        chat = False
    _check_answers(("chosen", "rejected"), tuple(answers))
    if answers[0] == answers[1]:
        raise _BadRow("chosen equals rejected")
    return _Texts(prompt, tuple(answers), chat)


def _prompt_texts(values: dict, tokenizer) -> _Texts:
    prompt = values.get("prompt")
    if isinstance(prompt, list):
        return _Texts(_render({"prompt": _messages(values, "prompt")}, tokenizer)["prompt"], (), chat=True)
    field = "messages" if values.get("messages") is not None else "chosen"
    if prompt is None and isinstance(values.get(field), list):
        messages = _messages(values, field)
        if messages[-1]["role"] == "assistant":  # a finished dialogue: generate the last reply afresh
            messages = messages[:-1]
        if not messages:
            raise _BadRow("no message before the assistant message")
        return _Texts(_render({"prompt": messages}, tokenizer)["prompt"], (), chat=True)
    if prompt is None and values.get("chosen") is not None:
        return _Texts(_hh_chosen(values)[0], (), chat=False)
    return _Texts(_text(values, "prompt"), (), chat=False)


_TEXTS = {"sft": _sft_texts, "chat": _chat_texts, "pairwise": _pairwise_texts, "prompt": _prompt_texts}
_ANSWER_NAMES = {"sft": ("response",), "chat": ("response",), "pairwise": ("chosen", "rejected"), "prompt": ()}


# ---- texts to token ids --------------------------------------------------------------------------------

def _encode(tokenizer, texts: list, add_special: list) -> list:
    """Token ids of each text; one batched call per value of `add_special`."""
    ids = [None] * len(texts)
    for flag in (True, False):
        index = [i for i, special in enumerate(add_special) if special == flag]
        if index:
            encoded = tokenizer([texts[i] for i in index], add_special_tokens=flag, verbose=False)["input_ids"]
            for i, row_ids in zip(index, encoded):
                ids[i] = list(row_ids)
    return ids


def _fit(prompt_ids: list, answers: list, names: tuple, config: DataConfig) -> tuple:
    """Applies `max_prompt_length` and `max_length`: cut the prompt on the left and each answer on
    the right, or refuse the row, as `config.truncation` says."""
    if len(prompt_ids) > config.max_prompt_length:
        if config.truncation == "skip":
            raise _BadRow("prompt over max_prompt_length", f"{len(prompt_ids)} > {config.max_prompt_length} tokens")
        prompt_ids = prompt_ids[-config.max_prompt_length:]  # the end of the prompt is what the answer follows
    room = config.max_length - len(prompt_ids)
    fitted = []
    for name, answer_ids in zip(names, answers):
        if len(answer_ids) > room:
            if config.truncation == "skip":
                raise _BadRow(f"prompt + {name} over max_length",
                              f"{len(prompt_ids) + len(answer_ids)} > {config.max_length} tokens")
            answer_ids = answer_ids[:max(room, 0)]  # a cut answer loses its eos: it did not end there
        fitted.append(answer_ids)
    return prompt_ids, fitted


def _columns(fmt: str, texts: _Texts, prompt_ids: list, answers: list) -> dict:
    if fmt == "prompt":
        return {"prompt_input_ids": prompt_ids, "prompt": texts.prompt}
    if fmt == "pairwise":
        if not all(answers):
            raise _BadRow("no room for the answers after the prompt")
        return {"chosen_input_ids": prompt_ids + answers[0], "rejected_input_ids": prompt_ids + answers[1],
                "prompt_length": len(prompt_ids)}  # where both answers start: DPO sums the answers' log-probs
    if not answers[0]:
        raise _BadRow("all labels masked")
    return {"input_ids": prompt_ids + answers[0], "labels": [IGNORE_INDEX] * len(prompt_ids) + answers[0]}


def _tokenize(fmt: str, texts: list, tokenizer, config: DataConfig) -> list:
    """Per row, the output columns, or the `_BadRow` that stops it."""
    special = [not t.chat for t in texts]
    prompts = _encode(tokenizer, [t.prompt for t in texts], special)
    joined = _encode(tokenizer, [t.prompt + a for t in texts for a in t.answers],
                     [s for t, s in zip(texts, special) for _ in t.answers])
    eos = tokenizer.eos_token_id
    outcomes, position = [], 0
    for row_texts, prompt_ids in zip(texts, prompts):
        full = joined[position:position + len(row_texts.answers)]
        position += len(row_texts.answers)
        # The answer starts where prompt+answer leaves the prompt's own tokens (as TRL's trainers do).
        prompt_len = min([common_prefix_length(prompt_ids, ids) for ids in full], default=len(prompt_ids))
        answers = [ids[prompt_len:] + ([eos] if ids[-1:] != [eos] else []) for ids in full]
        try:
            fitted = _fit(prompt_ids[:prompt_len], answers, _ANSWER_NAMES[fmt], config)
            outcomes.append(_columns(fmt, row_texts, *fitted))
        except _BadRow as bad:
            outcomes.append(bad)
    return outcomes


# ---- the pipeline -------------------------------------------------------------------------------------

def _no_template_error(row: _Row) -> DataError:
    return DataError(f"{row.file}: row {row.number} is a conversation, but the tokenizer has no chat template; "
                     "set `tokenizer.chat_template` (a Jinja string) or give the rows as prompt/response text")


def _prepare_file(path: str, fmt: str, tokenizer, config: DataConfig) -> tuple:
    """(tokenised Dataset, DataReport) for one file, directory or dataset name."""
    rows = _read_rows(path, _local_files(path))
    outcomes = []
    for row in rows:
        try:
            outcomes.append(_TEXTS[fmt](row.values, tokenizer))
        except _BadRow as bad:
            outcomes.append(bad)
        except _NoChatTemplate:
            raise _no_template_error(row) from None
    texts = [o for o in outcomes if isinstance(o, _Texts)]
    tokenized = iter(_tokenize(fmt, texts, tokenizer, config))
    outcomes = [next(tokenized) if isinstance(o, _Texts) else o for o in outcomes]

    report = DataReport(path=path, total_rows=len(rows), kept_rows=0)
    several_files = len({row.file for row in rows}) > 1
    columns = {}
    for row, outcome in zip(rows, outcomes):
        if isinstance(outcome, _BadRow):
            if config.strict:
                detail = f" ({outcome.detail})" if outcome.detail else ""
                raise DataError(f"{row.file}: row {row.number}: {outcome.reason}{detail}")
            reason = outcome.reason + (f" in {Path(row.file).name}" if several_files else "")
            report.skipped.setdefault(reason, []).append(row.number)
            continue
        for name, value in outcome.items():
            columns.setdefault(name, []).append(value)
    report.kept_rows = len(rows) - sum(len(numbers) for numbers in report.skipped.values())
    if report.kept_rows == 0:
        raise DataError(f"no usable rows: {report.summary()}")
    return Dataset.from_dict(columns), report


def _split(dataset: Dataset, eval_fraction: float, seed: int) -> tuple:
    """(train, eval): a `seed`-determined `eval_fraction` of the rows, at least one when there are two;
    both keep file order."""
    n = len(dataset)
    n_eval = min(max(round(n * eval_fraction), 1), n - 1) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    eval_index = sorted(order[:n_eval].tolist())
    train_index = sorted(order[n_eval:].tolist())
    return dataset.select(train_index), dataset.select(eval_index)


def prepare_file(config: DataConfig, tokenizer, path: Optional[str] = None) -> tuple[Dataset, DataReport]:
    """Loads, validates and tokenises one whole file, `path` (default `config.path`), as `config.format`;
    returns (dataset, report).

    Raises:
        DataError: naming the file: unreadable data (see `load_rows`), a bad row under
            `config.strict` (with its row number), a conversation without a chat template, a tokenizer
            without an eos token, or no rows left after filtering (with the report's summary).
    """
    fmt, path = config.format, config.path if path is None else path
    if path is None:
        raise DataError("`data.path` is not set; give a JSON / JSONL / Parquet file or a dataset name")
    if fmt not in FORMATS:
        raise DataError(f"{path}: `data.format` is {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "prompt" and tokenizer.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no eos token, which ends every {fmt} answer; "
                        "set `tokenizer.eos_token`")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: format 'chat' renders `messages` with the tokenizer's chat template, and "
                        "this tokenizer has none; set `tokenizer.chat_template` (a Jinja string) or use format "
                        "'sft' with prompt/response fields")
    return _prepare_file(path, fmt, tokenizer, config)


def prepare_dataset(config: DataConfig, tokenizer, seed: int) -> tuple[Dataset, Dataset, DataReport]:
    """`prepare_file` of `config.path`; returns (train, eval, report).

    Eval is `config.eval_path`, prepared the same way (its report in `report.eval_report`), or else a
    `seed`-determined `config.eval_fraction` of the kept rows.

    Raises:
        DataError: as `prepare_file`.
    """
    dataset, report = prepare_file(config, tokenizer)
    if config.eval_path is not None:
        eval_dataset, report.eval_report = prepare_file(config, tokenizer, config.eval_path)
        return dataset, eval_dataset, report
    train, eval_dataset = _split(dataset, config.eval_fraction, seed)
    return train, eval_dataset, report


# ---- collators --------------------------------------------------------------------------------------------

def _tensors(features: list, key: str) -> list:
    return [torch.as_tensor(feature[key], dtype=torch.long) for feature in features]


def _mask(sequences: list, padding_side: str) -> torch.Tensor:
    # From the lengths, not from `input_ids != pad`: the pad id is often the eos id, which is real data.
    return pad([torch.ones_like(ids) for ids in sequences], 0, padding_side)


def collate_sft(features: list, pad_token_id: int) -> dict:
    """Right-pads a batch of `input_ids` / `labels` rows.

    Returns `input_ids` (B, T) padded with `pad_token_id`, `labels` (B, T) padded with -100 and
    `attention_mask` (B, T), 1 on real tokens; T is the longest row.
    """
    input_ids = _tensors(features, "input_ids")
    return {"input_ids": pad(input_ids, pad_token_id, "right"),
            "labels": pad(_tensors(features, "labels"), IGNORE_INDEX, "right"),
            "attention_mask": _mask(input_ids, "right")}


def collate_pairwise(features: list, pad_token_id: int) -> dict:
    """Stacks chosen and rejected so one forward pass scores both.

    Returns `input_ids` and `attention_mask` of shape (2B, T), right-padded: rows 0..B-1 are the
    chosen sequences and rows B..2B-1 the rejected ones, in batch order (so `scores[:B]` pairs with
    `scores[B:]`); T is the longest of all 2B sequences. Rows that carry `prompt_length` also give
    `labels` (2B, T): the answer tokens, -100 on the prompt and the padding.
    """
    sequences = _tensors(features, "chosen_input_ids") + _tensors(features, "rejected_input_ids")
    batch = {"input_ids": pad(sequences, pad_token_id, "right"), "attention_mask": _mask(sequences, "right")}
    if all("prompt_length" in feature for feature in features):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        for row, feature in enumerate(features + features):
            labels[row, :feature["prompt_length"]] = IGNORE_INDEX
        batch["labels"] = labels
    return batch


def collate_prompts(features: list, pad_token_id: int) -> dict:
    """Left-pads generation prompts so every row's next token is generated at the same position.

    Returns `input_ids` (B, T) and `attention_mask` (B, T), 0 on the left padding; T is the longest prompt.
    """
    prompts = _tensors(features, "prompt_input_ids")
    return {"input_ids": pad(prompts, pad_token_id, "left"), "attention_mask": _mask(prompts, "left")}
