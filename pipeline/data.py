"""Rows in, token ids out: choosing, loading, validation and tokenisation shared by the SFT, reward,
ReMax and DPO stages.

    train, eval, report = prepare_dataset(config.data, tokenizer, seed=config.seed)
    print(report.summary())  # "data/train.jsonl: kept 97 of 100 rows; skipped 3 missing field 'chosen' (rows 4, 9, 17)"
    batch = collate_sft([train[i] for i in range(8)], tokenizer.pad_token_id)

Data (`data.path`): a JSON / JSON lines (also gzipped) / Parquet file, a local directory such as a
dataset snapshot, or a dataset name for `datasets.load_dataset`. `data.split` picks the split: a
directory's splits come from its README's `configs:` (`data.subset` picks one), else from its file
and folder names (`data/train-00000-of-00001.parquet`, `test/`), as `datasets` reads them;
`data.data_dir` and `data.data_files` narrow it down as in `load_dataset`.

Formats (`data.format`), the rows each reads (first match wins) and the columns it produces:

    sft      messages | chosen (or completion) messages after an optional prompt list
             | HH transcript in chosen | prompt + response (or completion, or chosen) text
             -> input_ids, labels
    chat     messages -> input_ids, labels
    pairwise chosen + rejected messages, prompt implicit (shared leading messages) or a list
             | HH transcripts sharing a prefix | prompt + chosen + rejected text
             -> chosen_input_ids, rejected_input_ids, prompt_length
    prompt   prompt list | prompt text next to a conversation (a user turn) | messages or chosen minus the
             last reply | HH transcript up to its last assistant turn | question or problem text (GSM8K,
             MATH: a user turn) | prompt text
             -> prompt_input_ids, prompt, columns (the row's other scalar fields as JSON), source

(`prompt` is the text as given, or as rendered by the chat template, even where its ids were cut.)
Conversations are rendered with `data.chat_template` or the tokenizer's own (`pipeline.chat_templates`).

SFT labels cover the answer and nothing else: the response of a prompt/response row, and every
assistant turn of a conversation or HH transcript, each with the template's end-of-turn tokens. A
token is an answer token when its first character lies in an answer (tokens straddling the start
belong to the prompt), so merges across the boundary never shift the mask; a last answer holding no
eos gets one. Pairwise and prompt rows join prompt and answer as they are (rm-static answers start
with a space) and tokenise them together; the answer starts where that sequence leaves the
tokenised prompt (`trl.data_utils.common_prefix_length`), as TRL's trainers do. Plain text gets the
tokenizer's special tokens (BOS); chat-rendered text does not, since the template writes them itself.

Tokenised splits are cached (`pipeline.data_cache`) under a fingerprint of the data, tokenizer,
template, lengths and this code: the ranks of a run tokenise once between them, before or after
joining the process group, and a later run with the same inputs loads the result.

Rows are numbered from 1 as in their file: the line number in JSON lines, the item number
in a JSON array, Parquet file or named dataset. Bad rows are skipped and counted in a
`DataReport`, or raise `DataError` with `data.strict`.
"""
from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import os
import re
from pathlib import Path
from typing import NamedTuple, Optional

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Dataset
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns, sanitize_patterns
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard
from trl.data_utils import apply_chat_template, common_prefix_length, extract_prompt, maybe_extract_prompt
from trl.trainer.utils import pad

from .chat_templates import resolve_chat_template
from .chunked_logits import IGNORE_INDEX  # labels the loss skips (torch cross_entropy's default ignore_index)
from .config import DataConfig
from .data_cache import cache_directory, file_digest, fingerprint, load_or_build, tokenizer_fingerprint

SUFFIXES = (".json", ".jsonl", ".parquet", ".json.gz", ".jsonl.gz")  # Anthropic/hh-rlhf ships train.jsonl.gz
FORMATS = ("sft", "pairwise", "prompt", "chat")
HH_ASSISTANT = "\n\nAssistant:"  # Anthropic HH / rm-static turn markers; a prompt ends with the last assistant one
HH_HUMAN = "\n\nHuman:"


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
    from_cache: bool = False  # loaded as another process (or an earlier run) tokenised it

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

def _is_data_file(file: Path) -> bool:
    return file.name.endswith(SUFFIXES)


def _read_text(file: Path) -> str:
    try:
        data = file.read_bytes()
        if file.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise DataError(f"{file}: cannot read the file: {getattr(error, 'strerror', None) or error}") from None
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


# ---- choosing the data: files, snapshot splits, named datasets -------------------------------------------

@dataclasses.dataclass
class _Source:
    """One split of one dataset: local files read here, or a dataset `datasets.load_dataset` gave."""

    label: str                        # names it in reports and errors
    files: Optional[list] = None      # local data files, in order
    dataset: Optional[Dataset] = None

    def rows(self) -> list:
        if self.files is None:
            return [_Row(self.label, number, dict(values)) for number, values in enumerate(self.dataset, 1)]
        return [row for file in self.files for row in _read_file(file)]

    def fingerprint(self) -> str:
        if self.files is None:
            return self.dataset._fingerprint  # datasets' own: builder, config, data files and split
        try:
            return file_digest(self.files)
        except OSError as error:
            raise DataError(f"{error.filename}: cannot read the file: {error.strerror or error}") from None


@dataclasses.dataclass
class _Choice:
    """Which part of a dataset: `data.subset`, `data.data_dir`, `data.data_files` (for `data.path` only)."""

    subset: Optional[str] = None
    data_dir: Optional[str] = None
    data_files: Optional[dict] = None


def _single_file(path: str) -> Optional[Path]:
    """The file `path` names, or None when it names a directory or no local file (a dataset name, then)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return None
    if local.exists() or _is_data_file(local) or path.startswith((".", "/", "~")):
        if not local.exists():
            raise DataError(f"{path}: file not found")
        if not _is_data_file(local):
            raise DataError(f"{path}: unknown file type {local.suffix!r}; use {', '.join(SUFFIXES)}")
        return local
    return None


def _snapshot_patterns(directory: Path, choice: _Choice) -> tuple:
    """(split -> file patterns, base directory) as `datasets` reads a local dataset: `data_files`, else the
    README's `configs:` (one per subset), else split names in file or folder names (train-*.parquet, test/)."""
    base = directory / choice.data_dir if choice.data_dir else directory
    if choice.data_files is not None:
        return sanitize_patterns(choice.data_files), base
    readme = directory / "README.md"
    configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data) if readme.is_file() else {}
    if configs and not choice.data_dir:
        name = choice.subset or configs.get_default_config_name() or (next(iter(configs)) if len(configs) == 1
                                                                      else None)
        if name not in configs:
            what = f"no subset {choice.subset!r}" if choice.subset else "several subsets"
            raise DataError(f"{directory}: {what}; its README.md lists {', '.join(configs)}; set `data.subset`")
        params = configs[name]
        base = directory / params["data_dir"] if params.get("data_dir") else directory
        if params.get("data_files") is not None:
            return sanitize_patterns(params["data_files"]), base
    elif choice.subset:
        raise DataError(f"{directory}: `data.subset` is {choice.subset!r}, but the directory has no subsets "
                        "(no `configs:` in a README.md); remove `data.subset` or use `data.data_dir`")
    try:
        return get_data_patterns(str(base)), base
    except EmptyDatasetError:
        raise DataError(f"{base}: the directory holds no {', '.join(SUFFIXES)} files") from None


def _snapshot_splits(directory: Path, choice: _Choice) -> dict:
    """split -> sorted data files of a local directory (files of other types left out)."""
    patterns, base = _snapshot_patterns(directory, choice)
    try:
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(base))
    except FileNotFoundError as error:
        raise DataError(f"{directory}: {error}") from None
    splits = {str(split): sorted(Path(f) for f in files if _is_data_file(Path(f)))
              for split, files in resolved.items()}
    splits = {split: files for split, files in splits.items() if files}
    if not splits:
        raise DataError(f"{directory}: the directory holds no {', '.join(SUFFIXES)} files")
    return splits


def _no_split(where: str, split: str, available, field: str) -> DataError:
    return DataError(f"{where}: no split {split!r}; it has {', '.join(repr(s) for s in available)}; set `{field}`")


def _load_named(name: str, split: str, field: str, choice: _Choice) -> Dataset:
    try:
        return datasets.load_dataset(name, choice.subset, split=split, data_dir=choice.data_dir,
                                     data_files=choice.data_files)
    except ValueError as error:
        unknown = re.match(r"Unknown split \"(.*)\"\. Should be one of (\[.*\])", str(error))
        if unknown:
            raise _no_split(name, split, ast.literal_eval(unknown.group(2)), field) from None
        if "config" in str(error).lower():  # an unknown or missing subset; datasets names those there are
            raise DataError(f"{name}: {error} (set `data.subset`)".replace("\n", "; ")) from None
        cause = error
    except Exception as error:  # the hub client raises many types; the user needs the name and the cause
        cause = error
    offline = " Offline, a dataset loads only from the local datasets cache, as an earlier run loaded it." \
        if datasets.config.HF_HUB_OFFLINE else ""
    raise DataError(f"{name}: not a local file or directory, and datasets.load_dataset could not load it "
                    f"as a dataset name: {type(cause).__name__}: {cause}{offline}")


def _select(path: str, split: str, field: str = "data.split", choice: Optional[_Choice] = None) -> _Source:
    """The rows of `split` of `path`: a file (split "train" only), a local directory or a dataset name.

    Raises:
        DataError: naming the path: a missing file, a split or subset it does not have (naming those it has).
    """
    choice = choice or _Choice()
    file = _single_file(path)
    if file is not None:
        if split != "train":
            raise DataError(f"{path} is one file, which datasets reads as split 'train' only; `{field}` is "
                            f"{split!r}: point the path at a directory of split files or remove `{field}`")
        chosen = [f"`data.{key}`" for key, value in dataclasses.asdict(choice).items() if value is not None]
        if chosen:
            raise DataError(f"{path} is one file; {', '.join(chosen)} choose files inside a directory or a "
                            "named dataset: remove them or point `data.path` at the directory")
        return _Source(path, files=[file])
    directory = Path(path).expanduser()
    if directory.is_dir():
        splits = _snapshot_splits(directory, choice)
        if split not in splits:
            raise _no_split(path, split, sorted(splits), field)
        label = path if list(splits) == ["train"] and choice.subset is None else f"{path} [{split}]"
        return _Source(label, files=splits[split])
    dataset = _load_named(path, split, field, choice)
    return _Source(f"{path}{f' ({choice.subset})' if choice.subset else ''} [{split}]", dataset=dataset)


def load_rows(path: str, split: str = "train") -> Dataset:
    """Reads a `.json` (array or JSON lines), `.jsonl` or `.parquet` file, a directory of them (its
    `split`, from the file names as `datasets` reads a snapshot), or `split` of a dataset name.

    JSON is parsed here rather than by `datasets` so that errors carry line numbers.

    Raises:
        DataError: naming the file, for a missing, empty, unreadable, non-UTF-8 or malformed file
            (with the line where the parser gives one), a split the data does not have, or rows
            that do not form one table.
    """
    source = _select(path, split)
    if source.dataset is not None:
        return source.dataset
    rows = source.rows()
    names = list(dict.fromkeys(key for row in rows for key in row.values))  # union, first-seen order
    try:
        return Dataset.from_dict({name: [row.values.get(name) for row in rows] for name in names})
    except (pa.ArrowException, TypeError, ValueError) as error:
        raise DataError(f"{path}: the rows do not form one table (a field holds different types in "
                        f"different rows?): {error}") from None


# ---- rows to texts ---------------------------------------------------------------------------------
#
# pairwise and prompt rows become a prompt and its answers (`_Texts`); sft and chat rows become one text
# with the character spans the loss is taken on (`_Turns`): every assistant turn of a conversation.

@dataclasses.dataclass
class _Texts:
    prompt: str
    answers: tuple  # pairwise: (chosen, rejected); prompt: ()
    chat: bool      # rendered by a chat template, which writes its own special tokens
    columns: Optional[dict] = None  # prompt rows: the row's other scalar fields, for the reward functions


@dataclasses.dataclass
class _Turns:
    text: str
    spans: tuple    # (start, end) characters of each answer (assistant turn), in order; the first starts after 0
    chat: bool


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


def _render_conversation(messages: list, tokenizer, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise _NoChatTemplate()
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as error:  # as in _render
        raise _BadRow("chat template failed", f"{type(error).__name__}: {error}") from None


def _conversation_turns(messages: list, tokenizer) -> _Turns:
    """The rendered conversation up to its last assistant message, and where each assistant message is
    in it: from the end of the conversation before it (with the generation prompt) to the end of the
    conversation through it, so the template's end-of-turn tokens are learned too."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise _BadRow("no assistant message")
    if assistant[0] == 0:
        raise _BadRow("no message before the assistant message")
    if any(not messages[i]["content"].strip() for i in assistant):
        raise _BadRow("empty assistant message")
    messages = messages[:assistant[-1] + 1]
    text = _render_conversation(messages, tokenizer, False)
    spans = []
    for i in assistant:
        before = _render_conversation(messages[:i], tokenizer, True)
        through = text if i == len(messages) - 1 else _render_conversation(messages[:i + 1], tokenizer, False)
        if not (text.startswith(through) and through.startswith(before) and len(before) < len(through)):
            raise _BadRow("chat template renders earlier turns differently once later turns follow")
        spans.append((len(before), len(through)))
    return _Turns(text, tuple(spans), chat=True)


def _hh_turns(transcript: str) -> _Turns:
    """An HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...", any number of turns) with each assistant turn
    as an answer span: from after its marker to the next human marker."""
    spans, marker = [], transcript.find(HH_ASSISTANT)
    if marker < 0:
        raise _BadRow("missing field 'prompt'", f"and no {HH_ASSISTANT!r} turn in 'chosen' to take it from")
    while marker >= 0:
        start = marker + len(HH_ASSISTANT)
        end = transcript.find(HH_HUMAN, start)
        end = len(transcript) if end < 0 else end
        if not transcript[start:end].strip():
            raise _BadRow("empty assistant turn in 'chosen'")
        spans.append((start, end))
        marker = transcript.find(HH_ASSISTANT, end)
    return _Turns(transcript, tuple(spans), chat=False)


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
    """(prompt, chosen answer) of an HH row without a prompt field, for generation prompts; a differing
    `rejected` helps find the prompt where the dialogue has no assistant marker."""
    chosen = _text(values, "chosen")
    rejected = values.get("rejected")
    usable = isinstance(rejected, str) and rejected.strip() and rejected != chosen
    prompt, answer, _ = _split_hh(chosen, rejected if usable else None)
    return prompt, answer


def _check_answers(names: tuple, answers: tuple) -> None:
    for name, answer in zip(names, answers):
        if not answer.strip():
            raise _BadRow(f"empty field '{name}'")


def _chat_texts(values: dict, tokenizer) -> _Turns:
    return _conversation_turns(_messages(values, "messages"), tokenizer)


def _sft_texts(values: dict, tokenizer) -> _Turns:
    """Conversations (`messages`; `chosen` or `completion` messages after an optional `prompt` list) with
    every assistant turn learned; HH transcripts likewise; else `prompt` + `response` (or `completion`,
    or `chosen`) with the response learned."""
    prompt = values.get("prompt")
    if isinstance(values.get("messages"), list):  # UltraChat, UltraFeedback's *_sft: `prompt` repeats turn one
        return _chat_texts(values, tokenizer)
    answer_field = next((f for f in ("chosen", "completion") if isinstance(values.get(f), list)), None)
    if answer_field is not None:  # conversational preference rows (their chosen side) or prompt-completion
        head = _messages(values, "prompt") if isinstance(prompt, list) else []
        return _conversation_turns(head + _messages(values, answer_field), tokenizer)
    if prompt is None and values.get("chosen") is not None:  # HH transcripts
        return _hh_turns(_text(values, "chosen"))
    prompt = _text(values, "prompt")
    field = next((f for f in ("response", "completion", "chosen") if values.get(f) is not None), "response")
    answer = _text(values, field)
    return _Turns(prompt + answer, ((len(prompt), len(prompt) + len(answer)),), chat=False)


def _pairwise_texts(values: dict, tokenizer) -> _Texts:
    if isinstance(values.get("chosen"), list) or isinstance(values.get("rejected"), list):
        example = {"chosen": _messages(values, "chosen"), "rejected": _messages(values, "rejected")}
        # TRL's explicit prompt; a string one (UltraFeedback) repeats the first turn of both sides.
        if isinstance(values.get("prompt"), list):
            example["prompt"] = _messages(values, "prompt")
        example = maybe_extract_prompt(example)  # implicit prompt: the shared leading messages
        if not example["prompt"]:
            raise _BadRow("chosen and rejected share no prompt")
        for side in ("chosen", "rejected"):
            if not example[side] or not example[side][-1]["content"].strip():
                raise _BadRow(f"empty answer in '{side}'")
        if example["chosen"] == example["rejected"]:
            raise _BadRow("chosen equals rejected")
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
    """The generation prompt, and the row's other scalar fields (a math problem's reference answer, ...)
    carried to the reward functions; lists (conversations) are not carried."""
    carried = {name: value for name, value in values.items()
               if name != "prompt" and (value is None or isinstance(value, (str, int, float, bool)))}
    return dataclasses.replace(_prompt_text(values, tokenizer), columns=carried)


def _prompt_text(values: dict, tokenizer) -> _Texts:
    prompt = values.get("prompt")
    if isinstance(prompt, list):
        return _Texts(_render({"prompt": _messages(values, "prompt")}, tokenizer)["prompt"], (), chat=True)
    field = "messages" if values.get("messages") is not None else "chosen"
    if isinstance(values.get(field), list):
        if prompt is not None:  # UltraFeedback, UltraChat: the string prompt is the conversation's first user turn
            messages = [{"role": "user", "content": _text(values, "prompt")}]
        else:
            messages = _messages(values, field)
            if messages[-1]["role"] == "assistant":  # a finished dialogue: generate the last reply afresh
                messages = messages[:-1]
            if not messages:
                raise _BadRow("no message before the assistant message")
        return _Texts(_render({"prompt": messages}, tokenizer)["prompt"], (), chat=True)
    if prompt is None and values.get("chosen") is not None:
        return _Texts(_hh_chosen(values)[0], (), chat=False)
    question = next((field for field in QUESTION_FIELDS if values.get(field) is not None), None)
    if prompt is None and question is not None:  # math problems: asked as a user turn
        messages = [{"role": "user", "content": _text(values, question)}]
        return _Texts(_render({"prompt": messages}, tokenizer)["prompt"], (), chat=True)
    return _Texts(_text(values, "prompt"), (), chat=False)


QUESTION_FIELDS = ("question", "problem")  # openai/gsm8k; MATH (hendrycks, lighteval, MATH-500)
_TEXTS = {"sft": _sft_texts, "chat": _chat_texts, "pairwise": _pairwise_texts, "prompt": _prompt_texts}
_ANSWER_NAMES = {"pairwise": ("chosen", "rejected"), "prompt": ()}


# ---- texts to token ids --------------------------------------------------------------------------------

def _encode(tokenizer, texts: list, add_special: list, offsets: bool = False) -> list:
    """Token ids (with `offsets`: (ids, character offsets)) of each text; one batched call per value of
    `add_special`."""
    out = [None] * len(texts)
    for flag in (True, False):
        index = [i for i, special in enumerate(add_special) if special == flag]
        if index:
            encoded = tokenizer([texts[i] for i in index], add_special_tokens=flag, verbose=False,
                                return_offsets_mapping=offsets)
            for position, i in enumerate(index):
                ids = list(encoded["input_ids"][position])
                out[i] = (ids, encoded["offset_mapping"][position]) if offsets else ids
    return out


def _cut_prompt(prompt_ids: list, config: DataConfig) -> list:
    if len(prompt_ids) > config.max_prompt_length:
        if config.truncation == "skip":
            raise _BadRow("prompt over max_prompt_length", f"{len(prompt_ids)} > {config.max_prompt_length} tokens")
        prompt_ids = prompt_ids[-config.max_prompt_length:]  # the end of the prompt is what the answer follows
    return prompt_ids


def _cut_answer(answer: list, room: int, name: str, prompt_len: int, config: DataConfig) -> list:
    if len(answer) > room:
        if config.truncation == "skip":
            raise _BadRow(f"prompt + {name} over max_length",
                          f"{prompt_len + len(answer)} > {config.max_length} tokens")
        answer = answer[:max(room, 0)]  # a cut answer loses its eos: it did not end there
    return answer


def _fit(prompt_ids: list, answers: list, names: tuple, config: DataConfig) -> tuple:
    """Applies `max_prompt_length` and `max_length`: cut the prompt on the left and each answer on
    the right, or refuse the row, as `config.truncation` says."""
    prompt_ids = _cut_prompt(prompt_ids, config)
    room = config.max_length - len(prompt_ids)
    return prompt_ids, [_cut_answer(answer, room, name, len(prompt_ids), config)
                        for name, answer in zip(names, answers)]


def _columns(fmt: str, texts: _Texts, prompt_ids: list, answers: list) -> dict:
    if fmt == "prompt":
        return {"prompt_input_ids": prompt_ids, "prompt": texts.prompt,
                "columns": json.dumps(texts.columns, ensure_ascii=False)}
    if not all(answers):
        raise _BadRow("no room for the answers after the prompt")
    return {"chosen_input_ids": prompt_ids + answers[0], "rejected_input_ids": prompt_ids + answers[1],
            "prompt_length": len(prompt_ids)}  # where both answers start: DPO sums the answers' log-probs


def _tokenize_texts(fmt: str, texts: list, tokenizer, config: DataConfig) -> list:
    """Per pairwise or prompt row, the output columns, or the `_BadRow` that stops it."""
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


def _answer_tokens(tokenizer, turns: _Turns, ids: list, offsets, special: bool) -> list:
    """Per span of `turns`, the indices of its tokens in `ids`: those whose first character lies in it
    (a token straddling the start belongs to the prompt). Without offsets (a slow tokenizer), the
    tokens past where each boundary's prefix, tokenised alone, leaves `ids`, as for pairwise rows."""
    if offsets is not None:
        return [[j for j, (first, after) in enumerate(offsets) if after > first and start <= first < end]
                for start, end in turns.spans]
    def boundary(position: int) -> int:
        if position >= len(turns.text):
            return len(ids)
        prefix = tokenizer(turns.text[:position], add_special_tokens=special, verbose=False)["input_ids"]
        return common_prefix_length(prefix, ids)
    return [list(range(boundary(start), boundary(end))) for start, end in turns.spans]


def _tokenize_turns(turns: list, tokenizer, config: DataConfig) -> list:
    """Per sft or chat row, {input_ids, labels} with labels on the answer spans only, or the `_BadRow`."""
    special = [not t.chat for t in turns]
    encoded = _encode(tokenizer, [t.text for t in turns], special, offsets=tokenizer.is_fast)
    eos = tokenizer.eos_token_id
    outcomes = []
    for row, flag, result in zip(turns, special, encoded):
        ids, offsets = result if tokenizer.is_fast else (result, None)
        spans = _answer_tokens(tokenizer, row, ids, offsets, flag)
        learned = sorted({j for span in spans for j in span})
        if not learned:
            outcomes.append(_BadRow("all labels masked"))
            continue
        labels = [IGNORE_INDEX] * len(ids)
        for j in learned:
            labels[j] = ids[j]
        # A last answer that holds no eos gets one, so the model learns to stop (templates that close a
        # turn with eos, as llama-2's and zephyr's do, already have it).
        if row.spans[-1][1] == len(row.text) and not any(ids[j] == eos for j in spans[-1]):
            ids, labels = ids + [eos], labels + [eos]
        try:
            start = learned[0]
            prompt_ids = _cut_prompt(ids[:start], config)
            room = config.max_length - len(prompt_ids)
            rest = _cut_answer(ids[start:], room, "response", len(prompt_ids), config)
            rest_labels = labels[start:start + len(rest)]
            if all(label == IGNORE_INDEX for label in rest_labels):
                raise _BadRow("all labels masked")
            outcomes.append({"input_ids": prompt_ids + rest,
                             "labels": [IGNORE_INDEX] * len(prompt_ids) + rest_labels})
        except _BadRow as bad:
            outcomes.append(bad)
    return outcomes


def _tokenize(fmt: str, texts: list, tokenizer, config: DataConfig) -> list:
    if fmt in ("sft", "chat"):
        return _tokenize_turns(texts, tokenizer, config)
    return _tokenize_texts(fmt, texts, tokenizer, config)


# ---- the pipeline -------------------------------------------------------------------------------------

TEMPLATE_HINT = ("set `data.chat_template` (a built-in: llama-2, chatml, zephyr; a template file; or a Jinja "
                 "string)")


def _no_template_error(row: _Row) -> DataError:
    return DataError(f"{row.file}: row {row.number} is a conversation, but the tokenizer has no chat template; "
                     f"{TEMPLATE_HINT}, or give the rows as prompt/response text")


def _build(source: _Source, fmt: str, tokenizer, config: DataConfig) -> tuple:
    """(tokenised Dataset, DataReport) of one source's rows."""
    rows = source.rows()
    outcomes = []
    for row in rows:
        try:
            outcomes.append(_TEXTS[fmt](row.values, tokenizer))
        except _BadRow as bad:
            outcomes.append(bad)
        except _NoChatTemplate:
            raise _no_template_error(row) from None
    texts = [o for o in outcomes if not isinstance(o, _BadRow)]
    tokenized = iter(_tokenize(fmt, texts, tokenizer, config))
    outcomes = [o if isinstance(o, _BadRow) else next(tokenized) for o in outcomes]

    report = DataReport(path=source.label, total_rows=len(rows), kept_rows=0)
    files = sorted({row.file for row in rows})
    several_files = len(files) > 1
    # A file's name, or its path inside the snapshot where names repeat (harmless-base/train.jsonl.gz).
    unique = len({Path(f).name for f in files}) == len(files)
    short_names = {f: Path(f).name if unique else os.path.relpath(f, os.path.commonpath(files)) for f in files}
    columns = {}
    for row, outcome in zip(rows, outcomes):
        if isinstance(outcome, _BadRow):
            if config.strict:
                detail = f" ({outcome.detail})" if outcome.detail else ""
                raise DataError(f"{row.file}: row {row.number}: {outcome.reason}{detail}")
            reason = outcome.reason + (f" in {short_names[row.file]}" if several_files else "")
            report.skipped.setdefault(reason, []).append(row.number)
            continue
        for name, value in outcome.items():
            columns.setdefault(name, []).append(value)
        if fmt == "prompt":  # where a prompt came from, for messages about its responses
            columns.setdefault("source", []).append(f"{row.file} row {row.number}")
    report.kept_rows = len(rows) - sum(len(numbers) for numbers in report.skipped.values())
    if report.kept_rows == 0:
        raise DataError(f"no usable rows: {report.summary()}")
    return Dataset.from_dict(columns), report


# Tokenised data from older code is not reused: the fingerprint covers these modules' source.
_CODE_FINGERPRINT = fingerprint(*(Path(module).read_text(encoding="utf-8")
                                  for module in (__file__, Path(__file__).with_name("chat_templates.py"))))


def _prepare_source(source: _Source, fmt: str, tokenizer, config: DataConfig) -> tuple:
    """`_build`, through the cache when `config.cache` is on: one process tokenises, the others load."""
    if not config.cache:
        return _build(source, fmt, tokenizer, config)
    key = fingerprint(_CODE_FINGERPRINT, source.label, source.fingerprint(), fmt, tokenizer_fingerprint(tokenizer),
                      config.max_length, config.max_prompt_length, config.truncation, config.strict)

    def build() -> tuple:
        dataset, report = _build(source, fmt, tokenizer, config)
        return dataset, dataclasses.asdict(report)

    directory = cache_directory(config.cache_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"`data.cache_dir` {directory}: cannot create it ({error.strerror or error}); set a writable "
                        "directory, or `data.cache: false` to tokenise on every rank") from None
    dataset, meta, built = load_or_build(directory, key, build)
    report = DataReport(**{**meta, "eval_report": None})
    report.from_cache = not built
    return dataset, report


def use_chat_template(tokenizer, config: DataConfig) -> None:
    """Sets `data.chat_template` (when given) on the tokenizer: the data is rendered with it, and the model
    is saved with it, so what serves the model later formats conversations as training did.

    Raises:
        DataError: naming `data.chat_template` when it names no template or its file cannot be read.
    """
    if config.chat_template is None:
        return
    try:
        tokenizer.chat_template = resolve_chat_template(config.chat_template)
    except (ValueError, OSError) as error:
        raise DataError(str(error)) from None


def _check(path: Optional[str], fmt: str, tokenizer) -> None:
    if path is None:
        raise DataError("`data.path` is not set; give a JSON / JSONL / Parquet file, a directory or a dataset name")
    if fmt not in FORMATS:
        raise DataError(f"{path}: `data.format` is {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "prompt" and tokenizer.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no eos token, which ends every {fmt} answer; "
                        "set `tokenizer.eos_token`")
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}: format 'chat' renders `messages` with a chat template, and the tokenizer has "
                        f"none; {TEMPLATE_HINT}, or use format 'sft' with prompt/response fields")


def prepare_file(config: DataConfig, tokenizer, path: Optional[str] = None, split: Optional[str] = None,
                 field: str = "data.split") -> tuple[Dataset, DataReport]:
    """Loads, validates and tokenises one whole split, `split` of `path` (default: `data.split` of
    `data.path`, with its subset, data_dir and data_files; another path's split "train"), as
    `config.format`; returns (dataset, report). `field` is the key a missing split is blamed on.
    `data.chat_template` is set on the tokenizer first.

    Raises:
        DataError: naming the file: unreadable data (see `load_rows`), a bad row under
            `config.strict` (with its row number), a conversation without a chat template, a tokenizer
            without an eos token, or no rows left after filtering (with the report's summary).
    """
    own = path is None or path == config.path
    path = config.path if path is None else path
    _check(path, config.format, tokenizer)
    use_chat_template(tokenizer, config)
    choice = _Choice(config.subset, config.data_dir, config.data_files) if own else None
    split = split or (config.split if own else "train")
    source = _select(path, split, field, choice)
    return _prepare_source(source, config.format, tokenizer, config)


def prepare_dataset(config: DataConfig, tokenizer, seed: int) -> tuple[Dataset, Dataset, DataReport]:
    """`prepare_file` of `data.split` of `data.path`; returns (train, eval, report).

    Eval is `data.eval_split` of `data.eval_path` (or of `data.path`), split "train" of `data.eval_path`
    when only that is given, each prepared the same way (its report in `report.eval_report`); else a
    `seed`-determined `data.eval_fraction` of the kept rows.

    Tokenised data goes through the cache (`data.cache`): the ranks of a run may call this together,
    before or after joining the process group; one tokenises while the others wait on a file lock.

    Raises:
        DataError: as `prepare_file`.
    """
    dataset, report = prepare_file(config, tokenizer)
    if config.eval_path is not None or config.eval_split is not None:
        eval_path = config.eval_path or config.path
        eval_dataset, report.eval_report = prepare_file(config, tokenizer, eval_path, config.eval_split or "train",
                                                        field="data.eval_split")
        return dataset, eval_dataset, report
    train, eval_dataset = _split(dataset, config.eval_fraction, seed)
    return train, eval_dataset, report


def _split(dataset: Dataset, eval_fraction: float, seed: int) -> tuple:
    """(train, eval): a `seed`-determined `eval_fraction` of the rows, at least one when there are two;
    both keep file order."""
    n = len(dataset)
    n_eval = min(max(round(n * eval_fraction), 1), n - 1) if n >= 2 else 0
    order = np.random.default_rng(seed).permutation(n)
    eval_index = sorted(order[:n_eval].tolist())
    train_index = sorted(order[n_eval:].tolist())
    return dataset.select(train_index), dataset.select(eval_index)


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
