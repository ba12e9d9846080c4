"""Typed run configuration: YAML, then `key.sub=value` overrides, validated before any heavy work.

Each concern is one dataclass section (model, data, optim, engine, training, logging,
checkpoint), defined here once; a stage nests them in its own config class and may add
a section of its own. Every problem is reported at once, each naming the field, the
value and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from .chunked_logits import LOGITS_CHUNK, chunk_problem
from .optim import OPTIMIZERS

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """One or more problems in a config; `problems` lists each as its own sentence."""

    def __init__(self, problems: list, source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


@dataclasses.dataclass
class LoraConfig:
    """LoRA through peft; `enabled: false` trains every parameter."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Only modules whose names contain this (e.g. "model.layers.") are adapted; empty: all.
    layers_pattern: str = ""


@dataclasses.dataclass
class ModelConfig:
    # A local Hugging Face directory, or None with `config` set to build a fresh model.
    path: Optional[str] = None
    # A model config as a dict (`model_type` plus its fields), for tiny models and dry runs.
    config: Optional[dict] = None
    tokenizer_path: Optional[str] = None  # defaults to `path`
    # A directory with the config.json of `path`'s architecture (no weights): plans and --dry-run build
    # the model from it while `path` does not exist yet (a model an earlier stage has still to write).
    architecture: Optional[str] = None
    attn_implementation: str = "sdpa"
    # The dtype weights are loaded in: fp32 | bf16 | fp16; null: the engine's precision. DeepSpeed keeps
    # its fp32 master copy itself, so a 16-bit run gains nothing from fp32 weights but their memory.
    dtype: Optional[str] = None
    gradient_checkpointing: bool = False
    # Tokens whose logits exist at once in the log-probabilities and losses (pipeline.chunked_logits: the
    # LM head runs chunk by chunk, recomputed in the backward); 0: the whole batch's logits at once.
    logits_chunk: int = LOGITS_CHUNK
    trust_remote_code: bool = False
    # With gradient checkpointing: the checkpointed layer inputs wait in host memory (pinned on GPU)
    # between the forward and the backward instead of on the device; copied out and back once each.
    offload_activations: bool = False
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


@dataclasses.dataclass
class DataConfig:
    # A JSON / JSONL / Parquet file, a directory of them (a local dataset snapshot), or a dataset name.
    path: Optional[str] = None
    split: str = "train"              # the split to train on (a snapshot's splits come from its file names)
    # A held-out split of the same data (e.g. test_prefs), or of `eval_path` when that is set.
    eval_split: Optional[str] = None
    # Held-out data; without it or `eval_split`, `eval_fraction` of the training split is held out.
    eval_path: Optional[str] = None
    eval_fraction: float = 0.05
    subset: Optional[str] = None      # the dataset's config name (`load_dataset(path, subset)`)
    data_dir: Optional[str] = None    # a folder inside the dataset or snapshot
    data_files: Optional[dict] = None  # split -> file, glob or list of them, inside the dataset or snapshot
    format: str = "sft"               # sft | pairwise | prompt | chat
    # Conversations are rendered with it: a built-in (llama-2, chatml, zephyr), a template file or a
    # Jinja string; unset, the tokenizer's own template. It is set on the tokenizer the model is saved with.
    chat_template: Optional[str] = None
    max_length: int = 512             # prompt + response tokens
    max_prompt_length: int = 256
    truncation: str = "skip"          # over-long rows: skip | truncate (prompt cut on the left, response on the right)
    strict: bool = False              # bad rows raise (with the row number) instead of being skipped
    # Tokenised data is kept, keyed by data, tokenizer, template and lengths, so one rank tokenises
    # and the others (and later runs) load it; default directory: under the `datasets` cache.
    cache: bool = True
    cache_dir: Optional[str] = None
    # Rows concatenated into packs of at most `packing_tokens` tokens instead of padded (sft, chat and
    # pairwise data); `engine.micro_batch_size` then counts packs (pipeline.packing).
    packing: bool = False
    packing_tokens: Optional[int] = None  # null: the longest row, `max_length` (pairwise: 2 x, a pair shares a pack)

    def pack_tokens(self) -> int:
        """Tokens a pack holds at most: `packing_tokens`, else one row of `max_length` (a pair's two)."""
        if self.packing_tokens is not None:
            return self.packing_tokens
        return self.max_length * (2 if self.format == "pairwise" else 1)


@dataclasses.dataclass
class OptimConfig:
    name: str = "adam_mini"           # a name in pipeline.optim.OPTIMIZERS: adam_mini | adamw
    lr: float = 1e-5
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    scheduler: str = "cosine"         # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0         # cosine and linear decay to lr * min_lr_ratio
    gradient_clipping: float = 1.0    # always passed to DeepSpeed explicitly; 0 disables
    # Adam-mini: every parameter in one param group, so DeepSpeed runs AdamW's few collectives per step
    # instead of a few per parameter; exact either way. false: one group per parameter, as upstream.
    # AdamW ignores it (its two groups: decay and no decay).
    shared_groups: bool = True


@dataclasses.dataclass
class EngineConfig:
    zero_stage: int = 2
    precision: str = "fp32"           # fp32 | bf16 | fp16
    offload_optimizer: bool = False   # ZeRO 1-3: optimizer state and step on the CPU
    offload_param: bool = False       # ZeRO-3 only
    micro_batch_size: int = 1         # per rank
    gradient_accumulation_steps: int = 1
    # Samples per optimizer step over all ranks; when set, accumulation is derived from it.
    global_batch_size: Optional[int] = None


@dataclasses.dataclass
class TrainingConfig:
    epochs: int = 1
    max_steps: Optional[int] = None   # optimizer steps; stops before `epochs` if reached
    eval_every_steps: Optional[int] = None
    eval_at_start: bool = True        # evaluate before the first step: every curve starts at step 0
    # Updates skipped in a row for non-finite loss or gradients before the run stops as diverged.
    max_consecutive_skips: int = 5


@dataclasses.dataclass
class LoggingConfig:
    every_steps: int = 1
    tensorboard: bool = True
    progress_bar: bool = True


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None
    resume: bool = False              # continue from the newest complete checkpoint in output_dir
    keep_last: int = 2
    overwrite: bool = False           # allow starting afresh in an output_dir that holds a run


@dataclasses.dataclass
class RunConfig:
    """The sections every stage has; stages subclass it and add their own."""

    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def problems(self) -> list:
        """Every inconsistency in the config, each naming the field, the value and the fix."""
        return common_problems(self)


CHOICES = {
    "data.format": ("sft", "pairwise", "prompt", "chat"),
    "data.truncation": ("skip", "truncate"),
    "optim.name": tuple(OPTIMIZERS),
    "optim.scheduler": ("cosine", "linear", "constant"),
    "engine.precision": ("fp32", "bf16", "fp16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
}


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def common_problems(config: RunConfig) -> list:
    problems = []
    for field, choices in CHOICES.items():
        value = _get(config, field)
        if value not in choices:
            problems.append(f"`{field}` is {value!r}; use one of {', '.join(choices)}")
    engine, optim, data = config.engine, config.optim, config.data
    if engine.zero_stage not in (0, 1, 2, 3):
        problems.append(f"`engine.zero_stage` is {engine.zero_stage}; use 0, 1, 2 or 3")
    if engine.offload_optimizer and engine.zero_stage == 0:
        problems.append("`engine.offload_optimizer` is true with `engine.zero_stage` 0; offload needs ZeRO 1, 2 or 3")
    if engine.offload_param and engine.zero_stage != 3:
        problems.append(f"`engine.offload_param` is true with `engine.zero_stage` {engine.zero_stage}; "
                        "parameter offload needs ZeRO-3")
    positive = {"engine.micro_batch_size": engine.micro_batch_size,
                "engine.gradient_accumulation_steps": engine.gradient_accumulation_steps,
                "data.max_length": data.max_length, "data.max_prompt_length": data.max_prompt_length,
                "training.epochs": config.training.epochs,
                "training.max_consecutive_skips": config.training.max_consecutive_skips,
                "logging.every_steps": config.logging.every_steps,
                "checkpoint.keep_last": config.checkpoint.keep_last, "model.lora.r": config.model.lora.r}
    for field in ("training.max_steps", "training.eval_every_steps", "checkpoint.every_steps"):
        if _get(config, field) is not None:
            positive[field] = _get(config, field)
    for field, value in positive.items():
        if value <= 0:
            problems.append(f"`{field}` is {value}; it must be a positive integer")
    if optim.name in OPTIMIZERS:
        problems += OPTIMIZERS[optim.name].problems(optim)
    if problem := chunk_problem("model.logits_chunk", config.model.logits_chunk):
        problems.append(problem)
    if optim.warmup_steps < 0:
        problems.append(f"`optim.warmup_steps` is {optim.warmup_steps}; it must not be negative")
    if not 0 < data.eval_fraction < 1:  # NaN fails this too
        problems.append(f"`data.eval_fraction` is {data.eval_fraction}; use a value in (0, 1)")
    if data.max_prompt_length >= data.max_length:
        problems.append(f"`data.max_prompt_length` ({data.max_prompt_length}) must be below `data.max_length` "
                        f"({data.max_length}) to leave room for a response")
    if config.model.path is None and config.model.config is None:
        problems.append("`model.path` is not set; give a local Hugging Face model directory "
                        "(or `model.config` to build a model from a config)")
    if config.model.path is not None and config.model.config is not None:
        problems.append("`model.path` and `model.config` are both set; give one of them")
    model_dtype = config.model.dtype
    if model_dtype is not None and model_dtype not in CHOICES["engine.precision"]:
        problems.append(f"`model.dtype` is {model_dtype!r}; use one of {', '.join(CHOICES['engine.precision'])}, "
                        "or leave it unset for the engine's precision")
    elif model_dtype in ("bf16", "fp16") and engine.precision == "fp32":
        problems.append(f"`model.dtype` is {model_dtype} with `engine.precision` fp32: the engine would train "
                        f"{model_dtype} weights with no fp32 master copy; set engine.precision={model_dtype} "
                        "or leave `model.dtype` unset")
    if config.model.offload_activations and not config.model.gradient_checkpointing:
        problems.append("`model.offload_activations` is true with `model.gradient_checkpointing` false; what it "
                        "offloads are the checkpointed layer inputs: set model.gradient_checkpointing=true")
    if config.model.architecture is not None and config.model.config is not None:
        problems.append("`model.architecture` is set with `model.config`, which gives the architecture itself; "
                        "drop one of them")
    lora = config.model.lora
    default_lora = LoraConfig()
    if not lora.enabled:
        changed = [f.name for f in dataclasses.fields(LoraConfig)
                   if f.name != "enabled" and getattr(lora, f.name) != getattr(default_lora, f.name)]
        if changed:
            problems.append(f"`model.lora.{changed[0]}` is set but `model.lora.enabled` is false; "
                            "set `model.lora.enabled: true` for LoRA or remove the LoRA settings")
    return problems + data_problems(config.data)


def data_problems(data: DataConfig) -> list:
    """The `data` section's own inconsistencies, each naming the field and the fix."""
    from .chat_templates import chat_template_problem  # no heavy imports: a plain module

    problems = []
    if data.path is None:
        problems.append("`data.path` is not set; give a JSON / JSONL / Parquet file, a directory or a dataset name")
    if data.eval_split is not None and data.eval_path is None and data.eval_split == data.split:
        problems.append(f"`data.eval_split` is {data.eval_split!r}, the training split; give a held-out split "
                        "(e.g. test) or leave it unset to split off `data.eval_fraction`")
    for field, value in (("data.split", data.split), ("data.eval_split", data.eval_split),
                         ("data.subset", data.subset), ("data.data_dir", data.data_dir)):
        if value is not None and not value.strip():
            problems.append(f"`{field}` is empty; give a name or remove the key")
    if data.data_files is not None:
        for split, files in data.data_files.items():
            names = files if isinstance(files, list) else [files]
            if not names or not all(isinstance(name, str) and name.strip() for name in names):
                problems.append(f"`data.data_files.{split}` is {files!r}; give a file, a glob or a list of them")
    template = chat_template_problem(data.chat_template)
    if template is not None:
        problems.append(template)
    return problems + packing_problems(data)


def packing_problems(data: DataConfig) -> list:
    """`data.packing` and `data.packing_tokens` against the format and the row length."""
    if not data.packing:
        if data.packing_tokens is not None:
            return ["`data.packing_tokens` is set but `data.packing` is false; set `data.packing: true` to pack "
                    "rows, or remove `data.packing_tokens`"]
        return []
    if data.format == "prompt":
        return ["`data.packing` is true with `data.format` 'prompt'; packing applies to sft, chat and pairwise "
                "data (the SFT, reward and DPO stages): set `data.packing: false`"]
    if data.packing_tokens is None:
        return []
    pair = data.format == "pairwise"
    longest = data.max_length * (2 if pair else 1)
    if data.packing_tokens < longest:
        held = f"2 x `data.max_length` ({longest}): a pair's chosen and rejected share a pack" if pair else \
            f"`data.max_length` ({longest})"
        return [f"`data.packing_tokens` is {data.packing_tokens}; a pack must hold the longest row, so use at "
                f"least {held}"]
    return []


# ---- loading ------------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp, field: str, problems: list):
    """Checks (and gently coerces) one value against its annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], field, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"`{field}` is {value!r}; expected a section (a mapping of keys)")
            return tp()
        return _build(tp, value, field + ".", problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(f"`{field}` is {value!r}; expected a finite number")
            return None
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            element_type = (typing.get_args(tp) or (None,))[0]
            if element_type is None:
                return list(value)
            count = len(problems)
            items = [_convert(item, element_type, f"{field}[{index}]", problems) for index, item in enumerate(value)]
            return items if len(problems) == count else None
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    problems.append(f"`{field}` is {value!r}; expected {_type_name(tp)}")
    return None


def _build(cls, values: dict, prefix: str, problems: list):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    # A section's renamed keys (`RENAMED = {old: new}`) are still read, with a warning naming the new one.
    for old, new in getattr(cls, "RENAMED", {}).items():
        if old not in values:
            continue
        if new in values:
            problems.append(f"`{prefix}{old}` and `{prefix}{new}` are both set; `{prefix}{old}` is the old name "
                            f"of `{prefix}{new}`: keep only `{prefix}{new}`")
            continue
        logger.warning("`%s%s` is deprecated: it is now `%s%s` (read as that)", prefix, old, prefix, new)
        values = {(new if key == old else key): value for key, value in values.items()}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; known keys: {', '.join(names)}"
            problems.append(f"unknown key `{prefix}{key}`{hint}")
            continue
        converted = _convert(value, hints[key], prefix + key, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    return cls(**kwargs)


def parse_override(text: str) -> tuple:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML (so 3, true, [1, 2] work)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not of the form key.sub=value"], "command line")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _merge(values: dict, path: list, value) -> None:
    node = values
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _yaml_kind(value) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    return "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"


def load_config(cls, path: Optional[str] = None, overrides: typing.Sequence = (), *, other_sections: bool = False):
    """Reads `path` (YAML), applies `key.sub=value` overrides, checks types and consistency.

    `other_sections=True` drops top-level sections `cls` does not have (a stage's own section,
    for tools that read only the shared ones, such as the memory planner).

    Raises:
        ConfigError: naming the file and every problem found (unknown keys with a
            did-you-mean, wrong types, out-of-range values, inconsistent combinations).
    """
    source = str(path) if path else "config"
    values = {}
    if path is not None:
        file = Path(path)
        if file.is_dir():
            raise ConfigError([f"{file} is a directory; give the YAML config file itself"], source)
        if not file.is_file():
            raise ConfigError([f"config file not found: {file}"], source)
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError([f"YAML syntax error{where}: {getattr(error, 'problem', error)}"], source) from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError([f"cannot read the config: {error}"], source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"the file holds {_yaml_kind(loaded)} at the top level; it must hold a mapping "
                               "of sections (`model:`, `data:`, ...)"], source)
        values = loaded or {}
    for override in overrides:
        _merge(values, *parse_override(override))
    if other_sections:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
    problems = []
    config = _build(cls, values, "", problems)
    # Fields that failed to parse kept their defaults; don't also judge those defaults.
    reported = {problem.split("`")[1] for problem in problems if "`" in problem}
    problems += [problem for problem in config.problems()
                 if "`" not in problem or problem.split("`")[1] not in reported]
    if problems:
        raise ConfigError(problems, source)
    return config


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path) -> None:
    """Writes the resolved config, as YAML a later run can read back."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
