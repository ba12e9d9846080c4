"""Tokenised once: the cache of prepare_dataset, shared by the ranks of a run and by later runs, and
invalidated by whatever changes the token ids."""
import shutil

import pytest

from pipeline.config import DataConfig
from pipeline.data import DataError, prepare_dataset
from tests import public_datasets as public
from tests.conftest import launch_ranks, read_json


@pytest.fixture(scope="module")
def ultrachat(tmp_path_factory):
    return public.write_ultrachat(tmp_path_factory.mktemp("data") / "ultrachat_200k")


def prepare(tok, path, cache_dir, **fields):
    fields = {"split": "train_sft", "eval_split": "test_sft", "format": "sft", "chat_template": "chatml", **fields}
    config = DataConfig(path=str(path), cache_dir=str(cache_dir), **fields)
    return prepare_dataset(config, tok, seed=0)


def rows(dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def test_a_second_call_loads_what_the_first_tokenised(ultrachat, tmp_path):
    tok = public.byte_tokenizer()
    train, test, report = prepare(tok, ultrachat, tmp_path)
    assert not report.from_cache and not report.eval_report.from_cache
    again, again_test, cached = prepare(tok, ultrachat, tmp_path)
    assert cached.from_cache and cached.eval_report.from_cache
    assert rows(again) == rows(train) and rows(again_test) == rows(test)
    assert cached.summary() == report.summary()
    fresh, _, _ = prepare(tok, ultrachat, tmp_path, cache=False)
    assert rows(fresh) == rows(train)


@pytest.mark.parametrize("change", ["template", "max_length", "truncation", "tokenizer", "data"])
def test_whatever_changes_the_ids_is_tokenised_afresh(ultrachat, tmp_path, change):
    data = tmp_path / "ultrachat"
    shutil.copytree(ultrachat, data)
    tok = public.byte_tokenizer()
    prepare(tok, data, tmp_path / "cache")
    fields = {}
    if change == "template":
        fields["chat_template"] = "zephyr"
    elif change == "max_length":
        fields["max_length"] = 400
    elif change == "truncation":
        fields["truncation"] = "truncate"
    elif change == "tokenizer":
        tok.add_tokens(["<|extra|>"])
    else:
        public.write_parquet(public.shard(data, "train_sft"), public.UC_TRAIN[:1], public.UC_SCHEMA)
    _, _, report = prepare(tok, data, tmp_path / "cache", **fields)
    assert not report.from_cache
    assert report.eval_report.from_cache == (change == "data")  # the test split's file did not change


@pytest.mark.slow
def test_two_ranks_tokenise_once(ultrachat, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    public.byte_tokenizer().save_pretrained(tokenizer_dir)
    out = tmp_path / "out"
    out.mkdir()
    launch_ranks(2, ["tests/pipeline/data_cache_worker.py", "--tokenizer", tokenizer_dir, "--data", ultrachat,
                     "--cache-dir", tmp_path / "cache", "--out", out])
    results = [read_json(out / f"rank{rank}.json") for rank in range(2)]
    assert sorted(r["tokenised"] for r in results) == [False, True]  # one rank tokenised, the other loaded
    assert sorted(r["eval_tokenised"] for r in results) == [False, True]
    assert results[0]["rows"] == results[1]["rows"] and results[0]["kept"] == 2
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2  # train and test, stored once


def test_an_unusable_cache_directory_is_named(ultrachat, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match=rf"`data.cache_dir` {blocker / 'cache'}: cannot create it .*"
                                        r"or `data.cache: false` to tokenise on every rank"):
        prepare(public.byte_tokenizer(), ultrachat, blocker / "cache")
