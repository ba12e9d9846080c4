"""Time for N ranks to have their tokenised data: every rank tokenising (`data.cache: false`) against
one rank tokenising while the others wait and load (`data.cache: true`,
empty cache), and against a cache an earlier run filled.

N worker processes start together (each imports everything first, then all are released at once) and
call `prepare_dataset` as a stage does; the time is from the release to the last rank holding its data.
Data: a generated local snapshot in the layout of Dahoas/rm-static (prompt/response text) or
HuggingFaceH4/ultrachat_200k (4-turn conversations, chatml), with a byte-level BPE tokenizer trained here.

    python -m benchmarks.data_prepare [--rows 50000] [--ranks 1,2,4] [--layouts rm-static,ultrachat] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had "
         "by hot word but what some we can out other were all there when up use your how said an each she which "
         "do their time if will way about many then them write would like so these her long make thing see him "
         "two has look more day could go come did number sound no most people my over know water than call first "
         "who may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three want "
         "air well also play small end put home read hand port large spell add even land here must big high "
         "such").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def write_data(root: Path, layout: str, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    (root / "data").mkdir(parents=True)
    if layout == "rm-static":  # ~120 prompt words, ~50 response words: about rm-static's lengths
        table = pa.Table.from_pylist([{"prompt": f"\n\nHuman: {sentence(rng, 120)}\n\nAssistant:",
                                       "response": " " + sentence(rng, 50)} for _ in range(rows)])
    else:
        message = pa.struct([("content", pa.string()), ("role", pa.string())])
        table = pa.Table.from_pylist(
            [{"messages": [{"content": sentence(rng, 40), "role": role} for role in ("user", "assistant") * 2]}
             for _ in range(rows)], schema=pa.schema([("messages", pa.list_(message))]))
    pq.write_table(table, root / "data" / "train-00000-of-00001.parquet")


def write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>",
                                                                    "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    rng = random.Random(1)
    backend.train_from_iterator([sentence(rng, 50) for _ in range(2000)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(directory)


def worker(args) -> None:
    from transformers import AutoTokenizer

    from pipeline.config import DataConfig
    from pipeline.data import prepare_dataset

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = DataConfig(path=args.data, format="sft", max_length=1024, max_prompt_length=512,
                        chat_template="chatml" if args.layout == "ultrachat" else None,
                        cache=args.cache == "on", cache_dir=args.cache_dir)
    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.005)
    train, evaluation, report = prepare_dataset(config, tokenizer, seed=0)
    print(json.dumps({"end": time.time(), "rows": report.kept_rows, "from_cache": report.from_cache,
                      "held": len(train) + len(evaluation)}))


def measure(ranks: int, data: Path, layout: str, tokenizer: Path, cache: str, cache_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as sync:
        go = Path(sync, "go")
        command = [sys.executable, "-m", "benchmarks.data_prepare", "--worker", "--data", str(data), "--layout", layout,
                   "--tokenizer", str(tokenizer), "--cache", cache, "--cache-dir", str(cache_dir), "--go", str(go)]
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        procs = [subprocess.Popen(command + ["--ready", str(Path(sync, f"ready{r}"))], stdout=subprocess.PIPE,
                                  text=True, env=env) for r in range(ranks)]
        while not all(Path(sync, f"ready{r}").exists() for r in range(ranks)):
            if any(p.poll() not in (None, 0) for p in procs):
                raise SystemExit("a worker failed")
            time.sleep(0.01)
        start = time.time()
        go.touch()
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"seconds": max(r["end"] for r in results) - start,
            "tokenised_by": sum(not r["from_cache"] for r in results), "rows": results[0]["rows"],
            "rank_rows": [r["held"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50000)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--layouts", default="rm-static,ultrachat")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--layout", "--tokenizer", "--cache", "--cache-dir", "--go", "--ready"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results = []
    with tempfile.TemporaryDirectory() as root:
        tokenizer = Path(root, "tokenizer")
        write_tokenizer(tokenizer)
        print(f"{'layout':<10} {'ranks':>5} {'every rank s':>13} {'cache cold s':>13} {'x':>6} "
              f"{'cache warm s':>13} {'x':>6}  tokenised by")
        for layout in args.layouts.split(","):
            data = Path(root, layout)
            write_data(data, layout, args.rows)
            for ranks in (int(n) for n in args.ranks.split(",")):
                cache_dir = Path(root, f"cache-{layout}-{ranks}")
                every = measure(ranks, data, layout, tokenizer, "off", cache_dir)
                cold = measure(ranks, data, layout, tokenizer, "on", cache_dir)
                warm = measure(ranks, data, layout, tokenizer, "on", cache_dir)
                row = {"layout": layout, "ranks": ranks, "rows": every["rows"], "every_rank_s": every["seconds"],
                       "cache_cold_s": cold["seconds"], "cache_warm_s": warm["seconds"],
                       "tokenised_by": [every["tokenised_by"], cold["tokenised_by"], warm["tokenised_by"]],
                       "rank_rows": [every["rank_rows"], cold["rank_rows"], warm["rank_rows"]]}
                results.append(row)
                print(f"{layout:<10} {ranks:>5} {every['seconds']:>13.2f} {cold['seconds']:>13.2f} "
                      f"{cold['seconds'] / every['seconds']:>6.2f} {warm['seconds']:>13.2f} "
                      f"{warm['seconds'] / every['seconds']:>6.2f}  {row['tokenised_by']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
