"""Tokenised data kept on disk under a fingerprint, built by one process while the others wait.

    key = fingerprint(source_hash, tokenizer_fingerprint(tokenizer), template, lengths)
    dataset, meta, built = load_or_build(cache_dir, key, build)   # build() -> (Dataset, dict)

The ranks of a run start together and all ask for the same key: a file lock lets the first build
and store it while the others wait, then every one memory-maps the stored copy. A later run with
the same data, tokenizer, template and lengths loads it too; any change gives another key. Entries
are never deleted here: remove the directory to reclaim the space. With ranks on several machines,
each machine builds once unless the directory is shared.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import datasets
from datasets import Dataset
from filelock import FileLock

META_FILE = "meta.json"  # written last: an entry without it is incomplete and is rebuilt


def default_cache_dir() -> Path:
    """`mini_rlhf_tokenized/` under the `datasets` cache (`HF_DATASETS_CACHE`, else ~/.cache/huggingface/datasets)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "mini_rlhf_tokenized"


def fingerprint(*parts) -> str:
    """A hex digest of JSON-able parts (anything else by its str)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def file_digest(files: list) -> str:
    """sha256 over the names and bytes of `files`: a rewritten file changes it even with the same size and time."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file).encode("utf-8") + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the ids a tokenizer gives: its vocabulary, merges, normaliser and post-processor
    (BOS), special tokens and chat template. Truncation and padding state is left out: calling the
    tokenizer changes it without changing what it encodes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:  # a slow (Python) tokenizer: datasets' own hash of the object
        from datasets.fingerprint import Hasher
        state = Hasher.hash(tokenizer)
    return fingerprint(type(tokenizer).__name__, state, tokenizer.special_tokens_map,
                       getattr(tokenizer, "chat_template", None), len(tokenizer))


def load_or_build(directory, key: str, build: Callable[[], tuple]) -> tuple[Dataset, dict, bool]:
    """(dataset, meta, built): the entry stored under `key`, built first by `build()` -> (Dataset, meta)
    when no process has stored it yet; `built` says whether this call built it.

    An exception from `build()` stores nothing, so the next process tries (and fails) the same way.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / key
    built = False
    with FileLock(str(directory / f"{key}.lock")):
        if not (target / META_FILE).is_file():
            dataset, meta = build()
            staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".{key}-"))
            quiet = not datasets.utils.are_progress_bars_disabled()
            datasets.utils.disable_progress_bars()  # a bar for a save that takes milliseconds is noise
            try:
                dataset.save_to_disk(str(staging / "data"))
            finally:
                if quiet:
                    datasets.utils.enable_progress_bars()
            (staging / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            built = True
    meta = json.loads((target / META_FILE).read_text(encoding="utf-8"))
    return Dataset.load_from_disk(str(target / "data")), meta, built


def cache_directory(cache_dir: Optional[str]) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
