"""Tokens/s of SFT with rows packed (`data.packing`) against padded, on a length mix like UltraChat's.

The rows are generated: each row's length is log-normal (median `--median` tokens, sigma `--sigma`),
cut to 16-`--max-length` tokens, a fifth of it prompt, words of the demo tokenizer (one token each),
so lengths run from tens to over a thousand tokens with a long tail, as UltraChat's conversations do.
Each variant runs the real SFT stage under the DeepSpeed launcher on 2 CPU ranks (ZeRO-2, fp32, one
thread per rank) on a fresh Llama (no weights needed: a step costs the same whatever they are):

    padded   micro-batch of `--rows-per-batch` rows, each padded to the micro-batch's longest
    packed   micro-batch of one pack of at most P tokens (best-fit decreasing), for each P of
             `--budgets`: the longest row, and the padded run's own budget (rows x max length)

Tokens/s counts real tokens only (the runs log them so, padded or packed), summed over both ranks, over
the wall time of the steps after `--warmup`; the ratio divides each run's by the padded run's. The
table also gives rank 0's peak RSS and the plan's peak (pipeline.plan on CPU ranks) for each run's
config. CPU SDPA attends over a packed sequence with a block-diagonal mask, computing the whole N x N
product; flash-attention's variable-length kernel on GPUs computes only the rows' own blocks.

    python -m benchmarks.packing_throughput [--steps 14] [--warmup 2] [--budgets 1024,4096] [--keep DIR]
        [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import yaml

from benchmarks.stage_throughput import (LAUNCH_TIMEOUT_S, MIB, TOKENIZER, launch, load_demo_tokenizer, read_steps,
                                         work_directory)

SEED = 0


def row_lengths(count: int, median: float, sigma: float, max_length: int, seed: int = SEED) -> list:
    """Token counts of `count` rows: log-normal around `median`, cut to [16, max_length]."""
    rng = random.Random(seed)
    return [min(max_length, max(16, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(count)]


def write_rows(path: Path, lengths: list, tokenizer, seed: int = SEED) -> Path:
    """SFT rows (prompt, response) of exactly these token counts: <bos>, a fifth of it prompt, the answer, <eos>."""
    rng = random.Random(seed)
    vocabulary = sorted(word for word in tokenizer.get_vocab() if word.isalpha() and word.islower())
    text = lambda n: " ".join(rng.choice(vocabulary) for _ in range(n))  # noqa: E731
    with open(path, "w", encoding="utf-8") as file:
        for length in lengths:
            words = length - 2
            prompt = max(1, words // 5)
            file.write(json.dumps({"prompt": text(prompt), "response": " " + text(words - prompt)}) + "\n")
    return path


def padding_share(lengths: list, rows_per_batch: int, samples: int = 2000, seed: int = SEED) -> float:
    """Mean share of a padded micro-batch's positions that are padding, over random micro-batches."""
    rng = random.Random(seed)
    shares = []
    for _ in range(samples):
        batch = rng.sample(lengths, rows_per_batch)
        shares.append(1 - sum(batch) / (rows_per_batch * max(batch)))
    return statistics.mean(shares)


def variants(rows_per_batch: int, budgets: list) -> dict:
    """name -> config overrides; the padded run first, the baseline every ratio divides by."""
    runs = {"padded": [f"engine.micro_batch_size={rows_per_batch}"]}
    for budget in budgets:
        runs[f"packed {budget}"] = ["engine.micro_batch_size=1", "data.packing=true", f"data.packing_tokens={budget}"]
    return runs


def write_config(path: Path, data: Path, args) -> Path:
    model = {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 32 * round(args.hidden * 8 / 3 / 32),
             "num_hidden_layers": args.layers, "num_attention_heads": 8, "num_key_value_heads": 4,
             "max_position_embeddings": args.max_length, "tie_word_embeddings": False, "vocab_size": args.vocab}
    values = {"seed": SEED, "model": {"config": model, "tokenizer_path": TOKENIZER},
              "data": {"path": str(data), "format": "sft", "eval_fraction": 0.01, "max_length": args.max_length,
                       "max_prompt_length": args.max_length // 2},
              "optim": {"name": "adamw", "lr": 1.0e-4, "scheduler": "constant"},
              "engine": {"zero_stage": 2},
              "training": {"epochs": 100, "max_steps": args.steps, "eval_at_start": False,
                           "eval_every_steps": 10**6},
              "logging": {"progress_bar": False, "tensorboard": False}}
    path.write_text(yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def planned_peak_mib(config_path: Path, overrides: list) -> float:
    from pipeline.plan import config_plan_rows

    config, rows = config_plan_rows(str(config_path), [2], overrides, stage="sft", gloo=True)
    return next(row["total_bytes"] for row in rows if (row["optimizer"], row["zero_stage"]) == ("adamw", 2)) / MIB


def measure(name: str, overrides: list, config_path: Path, root: Path, warmup: int) -> dict:
    """One launch: real tokens and rows per second over its timed steps, rank 0's peak RSS."""
    slug = name.replace(" ", "-")
    run_dir = root / slug
    overrides = [*overrides, f"output_dir={run_dir}", "checkpoint.overwrite=true"]
    started = time.perf_counter()
    failure = launch("sft", config_path, overrides, root / f"{slug}.log", LAUNCH_TIMEOUT_S)
    timed = [row for row in read_steps(run_dir) if row["step"] > warmup]
    if failure is None and not timed:
        failure = f"no steps after the {warmup} warm-up steps"
    result = {"run": name, "wall_s": time.perf_counter() - started, "plan_mib": planned_peak_mib(config_path, overrides)}
    if failure is not None:
        log = root / f"{slug}.log"
        print(f"\n{name} FAILED ({failure}):\n{log.read_text(errors='replace')[-3000:] if log.is_file() else ''}")
        return {**result, "failed": failure}
    seconds = sum(row["step_time"] for row in timed)
    tokens = sum(row["tokens_per_s"] * row["step_time"] for row in timed)
    return {**result, "timed_steps": len(timed), "tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / len(timed),
            "tokens_per_step": tokens / len(timed), "peak_rss_mib": max(row["peak_memory_bytes"] for row in timed) / MIB}


def print_table(rows: list) -> None:
    baseline = rows[0]
    header = ("run", "step ms", "tokens/step", "tokens/s", "x padded", "peak RSS MiB", "plan MiB")
    lines = []
    for row in rows:
        if "failed" in row:
            lines.append((row["run"], "failed") + ("",) * (len(header) - 2))
            continue
        ratio = row["tokens_per_s"] / baseline["tokens_per_s"] if "failed" not in baseline else math.nan
        row["ratio"] = ratio
        lines.append((row["run"], f"{row['step_ms']:.0f}", f"{row['tokens_per_step']:.0f}", f"{row['tokens_per_s']:.0f}",
                      f"{ratio:.2f}", f"{row['peak_rss_mib']:.0f}", f"{row['plan_mib']:.0f}"))
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    for line in [header] + lines:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--rows", type=int, default=2000, help="rows generated")
    parser.add_argument("--median", type=float, default=160.0, help="median row length, tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="spread of log(length)")
    parser.add_argument("--max-length", type=int, default=1024, help="data.max_length: the longest row")
    parser.add_argument("--rows-per-batch", type=int, default=4, help="the padded run's micro-batch")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated packing_tokens (default: max length, and rows-per-batch x max length)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000, help="model vocabulary (the logits' width)")
    parser.add_argument("--keep", metavar="DIR", help="keep data, configs, runs and logs here")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args()
    try:
        args.budgets = ([int(value) for value in args.budgets.split(",")] if args.budgets else
                        [args.max_length, args.rows_per_batch * args.max_length])
    except ValueError:
        parser.error(f"--budgets is {args.budgets!r}; give comma-separated token counts, e.g. 1024,4096")
    problems = [f"--budgets {budget} is below --max-length {args.max_length}: a pack must hold the longest row"
                for budget in args.budgets if budget < args.max_length]
    if args.steps <= args.warmup:
        problems.append(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
    if args.hidden <= 0 or args.hidden % 16 or args.layers <= 0 or args.rows_per_batch <= 0:
        problems.append("--hidden must be a positive multiple of 16; --layers and --rows-per-batch positive")
    if problems:
        parser.error("; ".join(problems))
    return args


def run_all(args, root: Path) -> list:
    tokenizer = load_demo_tokenizer()
    lengths = row_lengths(args.rows, args.median, args.sigma, args.max_length)
    data = write_rows(root / "rows.jsonl", lengths, tokenizer)
    quantiles = statistics.quantiles(lengths, n=20)
    print(f"{args.rows} rows, tokens: min {min(lengths)}, median {statistics.median(lengths):.0f}, mean "
          f"{statistics.mean(lengths):.0f}, 90th percentile {quantiles[17]:.0f}, max {max(lengths)}; a padded "
          f"micro-batch of {args.rows_per_batch} rows is {100 * padding_share(lengths, args.rows_per_batch):.0f}% "
          f"padding on average", flush=True)
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fp32, ZeRO-2, AdamW, 2 CPU ranks "
          f"x 1 thread; {args.steps} steps per run, the first {args.warmup} left out; work dir {root}", flush=True)
    config_path = write_config(root / "sft.yaml", data, args)
    rows = []
    for name, overrides in variants(args.rows_per_batch, args.budgets).items():
        rows.append(measure(name, overrides, config_path, root, args.warmup))
        print(f"  {name}: {'failed' if 'failed' in rows[-1] else 'done'} in {rows[-1]['wall_s']:.0f} s", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with work_directory(args.keep, "packing_throughput-") as root:
        rows = run_all(args, root)
    print()
    print_table(rows)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
