"""Tokens/s and peak memory of SFT and ReMax training steps, Adam-mini next to AdamW.

Every (stage, ZeRO stage) pair runs the real stage under the DeepSpeed launcher on 2 CPU ranks,
once with AdamW and once with Adam-mini, back to back so machine noise hits both alike. The
model is a fresh Llama (no weights needed) over the demo tokenizer; ReMax starts from a saved
copy of it and scores with an untrained reward model built from it, both made here, not trained:
the step costs the same whatever the weights. The first `--warmup` steps of each run are
dropped; the rest give the median step time, tokens/s and time inside `engine.step()` (the
optimizer's share: gradient norm and clipping, the update, the ZeRO all-gather). Memory is rank
0's peak RSS (it holds Python, torch and the data too; large allocations are served by mmap so
that RSS follows live memory, see MALLOC_RETURNS_MEMORY) and rank 0's optimizer state.

    python -m benchmarks.stage_throughput [--steps 12] [--warmup 3] [--stages sft,remax] [--zero 2,3]
        [--hidden 1024] [--layers 4] [--repeats 1] [--keep DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
# AdamW first: the baseline every ratio divides by. Each variant is the config overrides it runs with.
OPTIMIZERS = {"adamw": ["optim.name=adamw"],
              "adam_mini": ["optim.name=adam_mini", "optim.shared_groups=false"],     # one group per parameter
              "adam_mini_shared": ["optim.name=adam_mini", "optim.shared_groups=true"]}
STAGES = ("sft", "remax")
TOKENIZER = "data/demo/tokenizer"
LAUNCH_TIMEOUT_S = 1200
MIB = 2**20
# Figures divided by AdamW's: whole step, engine.step() alone (where the optimizers differ), rate, memory.
RATIO_COLUMNS = ("step_ms", "optimizer_step_ms", "tokens_per_s", "peak_rss_mib", "state_mib")
# glibc keeps freed heap pages resident and hands them to the next allocation, so peak RSS is its
# high-water mark: the backward's temporaries fill whatever a smaller optimizer state left free, and
# the saving vanishes from the peak. Served by mmap (>= 64 KiB) and returned at once, memory is
# resident only while live; measured on a 46M Llama under ZeRO-2, peak RSS then falls by 89.3 MiB
# for an 88.0 MiB smaller state, against 0-60 MiB with glibc's defaults. Both optimizers run so.
MALLOC_RETURNS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

# Shared by both stages: small sequences (demo data, <= 40 tokens) so that the optimizer's share
# of a step is visible next to the forward and backward passes.
COMMON = {
    "seed": 0,
    "optim": {"lr": 1.0e-4, "betas": [0.9, 0.95], "weight_decay": 0.0, "scheduler": "constant",
              "warmup_steps": 0},
    "engine": {"micro_batch_size": 8},
    "logging": {"progress_bar": False, "tensorboard": False},
}
SFT = {
    "data": {"path": "data/demo/sft.jsonl", "format": "sft", "eval_fraction": 0.05, "max_length": 40,
             "max_prompt_length": 24},
}
REMAX = {
    "data": {"path": "data/demo/prompts.jsonl", "format": "prompt", "max_length": 40, "max_prompt_length": 24},
    # Frozen models stay whole on each rank (ZeRO-0) in every run, so only the actor's
    # optimizer differs between the two runs of a pair. Evaluation runs only at step 0 and after
    # the last step, outside the timed steps.
    "remax": {"eval_prompts_path": "data/demo/eval_prompts.jsonl", "max_new_tokens": 12, "kl_coef": 0.05,
              "eval_every_steps": 10**6, "ref_zero_stage": 0, "reward_zero_stage": 0},
}


def model_config(hidden: int, layers: int) -> dict:
    """A Llama config dict for `model.config`; the vocabulary and special ids come from the tokenizer."""
    return {"model_type": "llama", "hidden_size": hidden,
            "intermediate_size": 32 * round(hidden * 8 / 3 / 32),  # Llama's 8/3 MLP ratio
            "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 4,
            "max_position_embeddings": 64, "tie_word_embeddings": False}


# ---- the models -------------------------------------------------------------------------------------

def load_demo_tokenizer():
    from pipeline.config import ModelConfig
    from pipeline.models import load_tokenizer

    return load_tokenizer(ModelConfig(tokenizer_path=str(REPO_ROOT / TOKENIZER)))


def with_vocabulary(config: dict, tokenizer) -> dict:
    """`config` with the tokenizer's vocabulary size and special ids, as stages.sft fills them in."""
    return {**config, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def parameter_count(config: dict, tokenizer) -> int:
    from pipeline.config import ModelConfig
    from pipeline.models import count_parameters, load_causal_lm

    model = load_causal_lm(ModelConfig(config=with_vocabulary(config, tokenizer)), device="meta")
    return count_parameters(model)[0]


def save_remax_models(root: Path, config: dict, tokenizer) -> tuple:
    """(policy dir, reward-model dir): a fresh Llama with the tokenizer, and a RewardModel started
    from it; seeded, so every run of a benchmark starts from the same weights."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import RewardModel, config_from_dict
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" would interleave with the run lines
    policy_dir, reward_dir = root / "policy", root / "reward"
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(config_from_dict(with_vocabulary(config, tokenizer)))
    policy.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    torch.manual_seed(1)
    RewardModel.from_causal_lm(ModelConfig(path=str(policy_dir))).save_pretrained(reward_dir)
    return policy_dir, reward_dir


# ---- one run ----------------------------------------------------------------------------------------

def write_stage_config(stage: str, path: Path, config: dict, steps: int, remax_models: Optional[tuple]) -> Path:
    """The stage's YAML; the optimizer, ZeRO stage and output_dir come as overrides per run."""
    values = {**COMMON, **(SFT if stage == "sft" else REMAX), "training": {"epochs": 100, "max_steps": steps}}
    if stage == "sft":
        values["model"] = {"config": config, "tokenizer_path": TOKENIZER}
    else:
        policy_dir, reward_dir = remax_models
        values["model"] = {"path": str(policy_dir)}
        values["remax"] = {**values["remax"], "reward_model_path": str(reward_dir)}
    header = f"# written by benchmarks/stage_throughput.py: {stage}, {steps} steps\n"
    path.write_text(header + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: str, config_path: Path, overrides: list, log_path: Path, timeout_s: int) -> Optional[str]:
    """Runs the stage on WORLD_SIZE CPU ranks, output to `log_path`; returns None, or why it failed."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(WORLD_SIZE),
               "--master_port", str(free_port()), "--module", f"stages.{stage}", "--config", str(config_path),
               *overrides]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO_ROOT), **MALLOC_RETURNS_MEMORY)
    return run_in_own_session(command, env, log_path, timeout_s)


def launch_script(script: str, config: str, overrides: list, log_path: Path, timeout_s: int) -> Optional[str]:
    """Runs a stage script as the demo does (WORLD_SIZE ranks, this Python); returns None, or why it failed."""
    env = dict(os.environ, NUM_GPUS=str(WORLD_SIZE), PYTHON=sys.executable, TOKENIZERS_PARALLELISM="false")
    return run_in_own_session(["bash", script, config, *overrides], env, log_path, timeout_s)


@contextlib.contextmanager
def work_directory(keep, prefix: str):
    """Where a benchmark's runs go: `keep` (created) when the caller keeps them, else a temporary
    directory removed afterwards."""
    if keep:
        root = Path(keep).resolve()
        root.mkdir(parents=True, exist_ok=True)
        yield root
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as temp:
            yield Path(temp)


def run_in_own_session(command: list, env: dict, log_path: Path, timeout_s: int) -> Optional[str]:
    """Runs `command` from the repository root, output to `log_path`; returns None, or why it failed.
    It starts in a session of its own, so on a timeout its whole group (ranks included) is stopped."""
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            return f"timed out after {timeout_s} s"
    return None if code == 0 else f"exit code {code}"


def read_steps(run_dir: Path) -> list:
    """The training rows of `metrics.jsonl` (those with a step time), in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted((row for row in rows if "step_time" in row), key=lambda row: row["step"])


def measure(stage: str, optimizer: str, zero_stage: int, repeat: int, config_path: Path, root: Path,
            warmup: int) -> dict:
    """One launch; its timed steps, rank 0's peak RSS and optimizer state, or `failed` with the reason."""
    run_dir = root / f"{stage}-zero{zero_stage}-{optimizer}-r{repeat}"
    log_path = root / f"{run_dir.name}.log"
    overrides = [*OPTIMIZERS[optimizer], f"engine.zero_stage={zero_stage}", f"output_dir={run_dir}",
                 "checkpoint.overwrite=true"]
    started = time.perf_counter()
    failure = launch(stage, config_path, overrides, log_path, LAUNCH_TIMEOUT_S)
    result = {"stage": stage, "zero": zero_stage, "optimizer": optimizer, "repeat": repeat,
              "wall_s": time.perf_counter() - started}
    steps = read_steps(run_dir)
    timed = [row for row in steps if row["step"] > warmup]
    if failure is None and not timed:
        failure = f"no steps after the {warmup} warm-up steps in {run_dir / 'metrics.jsonl'}"
    if failure is not None:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:] if log_path.is_file() else ""
        print(f"\n{run_dir.name} FAILED ({failure}); last output:\n{tail}\n", flush=True)
        return {**result, "failed": failure}
    state = next((row["optimizer_state_bytes"] for row in steps if "optimizer_state_bytes" in row), None)
    return {**result, "step_times": [row["step_time"] for row in timed],
            "optimizer_step_times": [row["optimizer_step_time"] for row in timed],
            "tokens_per_s": [row["tokens_per_s"] for row in timed],
            "peak_memory_bytes": max(row["peak_memory_bytes"] for row in steps), "optimizer_state_bytes": state}


# ---- the table --------------------------------------------------------------------------------------

def combine(runs: list) -> dict:
    """One row from the repeats of one (stage, ZeRO, optimizer): medians over all their timed steps,
    the median of their peaks, and the optimizer state rank 0 logged at step 1."""
    first = runs[0]
    row = {"stage": first["stage"], "zero": first["zero"], "optimizer": first["optimizer"]}
    done = [run for run in runs if "failed" not in run]
    if not done:
        return {**row, "failed": "; ".join(run["failed"] for run in runs)}
    return {**row, "repeats": len(done), "timed_steps": sum(len(run["step_times"]) for run in done),
            "step_ms": 1e3 * statistics.median(t for run in done for t in run["step_times"]),
            "optimizer_step_ms": 1e3 * statistics.median(t for run in done for t in run["optimizer_step_times"]),
            "tokens_per_s": statistics.median(v for run in done for v in run["tokens_per_s"]),
            "peak_rss_mib": statistics.median(run["peak_memory_bytes"] for run in done) / MIB,
            "state_mib": done[0]["optimizer_state_bytes"] / MIB}


def add_ratios(rows: list) -> list:
    """Each row's figures over AdamW's for the same stage and ZeRO stage (none where either failed)."""
    baselines = {(row["stage"], row["zero"]): row for row in rows if row["optimizer"] == "adamw"}
    for row in rows:
        baseline = baselines.get((row["stage"], row["zero"]))
        if "failed" in row or baseline is None or "failed" in baseline:
            continue
        for name in RATIO_COLUMNS:
            row[f"{name}_vs_adamw"] = row[name] / baseline[name]
    return rows


def print_table(rows: list) -> None:
    header = ("stage", "ZeRO", "optimizer", "step ms", "engine.step ms", "tokens/s", "peak RSS MiB",
              "opt state MiB", "x step ms", "x engine.step", "x tokens/s", "x peak", "x state")
    lines = []
    for row in rows:
        start = (row["stage"], str(row["zero"]), row["optimizer"])
        if "failed" in row:
            lines.append(start + ("failed",) + ("",) * (len(header) - 4))
            continue
        ratios = tuple(f"{row[name + '_vs_adamw']:.3f}" if name + "_vs_adamw" in row else "-"
                       for name in RATIO_COLUMNS)
        lines.append(start + (f"{row['step_ms']:.1f}", f"{row['optimizer_step_ms']:.1f}", f"{row['tokens_per_s']:.0f}",
                              f"{row['peak_rss_mib']:.1f}", f"{row['state_mib']:.2f}") + ratios)
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    for line in [header] + lines:
        print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(line, widths))).rstrip())


def compare(rows: list) -> list:
    """Per (stage, ZeRO): the two targets, Adam-mini at least as fast as AdamW and its peak RSS lower
    by at least the optimizer-state difference."""
    by_key = {(row["stage"], row["zero"], row["optimizer"]): row for row in rows}
    verdicts = []
    for stage, zero_stage in dict.fromkeys((row["stage"], row["zero"]) for row in rows):
        adamw, mini = by_key[(stage, zero_stage, "adamw")], by_key[(stage, zero_stage, "adam_mini")]
        if "failed" in adamw or "failed" in mini:
            continue
        peak_saved, state_saved = adamw["peak_rss_mib"] - mini["peak_rss_mib"], adamw["state_mib"] - mini["state_mib"]
        verdicts.append({"stage": stage, "zero": zero_stage, "tokens_per_s_ratio": mini["tokens_per_s_vs_adamw"],
                         "optimizer_step_ratio": mini["optimizer_step_ms_vs_adamw"],
                         "at_least_as_fast": mini["tokens_per_s"] >= adamw["tokens_per_s"],
                         "peak_saved_mib": peak_saved, "state_saved_mib": state_saved,
                         "peak_saving_covers_state": peak_saved >= state_saved})
    return verdicts


def print_verdicts(verdicts: list) -> None:
    for v in verdicts:
        print(f"{v['stage']} ZeRO-{v['zero']}: tokens/s x{v['tokens_per_s_ratio']:.3f} of AdamW "
              f"({'at least as fast' if v['at_least_as_fast'] else 'SLOWER'}), engine.step() "
              f"x{v['optimizer_step_ratio']:.3f} of AdamW's time; peak RSS AdamW - Adam-mini "
              f"{v['peak_saved_mib']:+.1f} MiB vs optimizer state {v['state_saved_mib']:+.1f} MiB "
              f"({'covers it' if v['peak_saving_covers_state'] else 'does NOT cover it'})")


# ---- main -------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each run left out of the medians")
    parser.add_argument("--stages", default="sft,remax", help="comma-separated: sft, remax")
    parser.add_argument("--zero", default="2,3", help="comma-separated ZeRO stages (0-3)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (8 heads, 4 KV heads)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per optimizer, alternating AdamW-first and Adam-mini-first")
    parser.add_argument("--keep", metavar="DIR", help="keep configs, run dirs and launch logs here")
    parser.add_argument("--json", metavar="PATH", help="also write rows and verdicts as JSON here")
    args = parser.parse_args()
    try:
        args.stages = [name.strip() for name in args.stages.split(",") if name.strip()]
        args.zero = [int(value) for value in args.zero.split(",") if value.strip()]
    except ValueError:
        parser.error(f"--zero is {args.zero!r}; give comma-separated integers, e.g. 2,3")
    problems = [f"--stages names {name!r}; use sft and/or remax" for name in args.stages if name not in STAGES]
    problems += [f"--zero names {value}; use 0, 1, 2 or 3" for value in args.zero if value not in (0, 1, 2, 3)]
    if not args.stages or not args.zero:
        problems.append("--stages and --zero must each name at least one")
    if args.steps <= args.warmup:
        problems.append(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}")
    if args.hidden <= 0 or args.hidden % 16:
        problems.append(f"--hidden is {args.hidden}; use a positive multiple of 16 (8 heads of even size)")
    if args.layers <= 0 or args.repeats <= 0:
        problems.append("--layers and --repeats must be positive")
    if problems:
        parser.error("; ".join(problems))
    return args


def run_all(args, root: Path) -> tuple:
    """(parameter count, table rows with ratios) after every launch."""
    tokenizer = load_demo_tokenizer()
    config = model_config(args.hidden, args.layers)
    parameters = parameter_count(config, tokenizer)
    print(f"Llama, hidden {args.hidden}, {args.layers} layers, {parameters:,} parameters "
          f"(fp32), {WORLD_SIZE} CPU ranks x 1 thread, {args.steps} steps per run of which the first {args.warmup} "
          f"are dropped, {args.repeats} run(s) per optimizer; work dir {root}", flush=True)
    remax_models = save_remax_models(root / "models", config, tokenizer) if "remax" in args.stages else None
    rows = []
    for stage in args.stages:
        config_path = write_stage_config(stage, root / f"{stage}.yaml", config, args.steps, remax_models)
        for zero_stage in args.zero:
            runs = {name: [] for name in OPTIMIZERS}
            for repeat in range(args.repeats):
                order = list(OPTIMIZERS) if repeat % 2 == 0 else list(OPTIMIZERS)[::-1]
                for optimizer in order:
                    run = measure(stage, optimizer, zero_stage, repeat, config_path, root, args.warmup)
                    print(f"  {stage} ZeRO-{zero_stage} {optimizer} run {repeat}: "
                          f"{'failed' if 'failed' in run else 'done'} in {run['wall_s']:.0f} s", flush=True)
                    runs[optimizer].append(run)
            rows += [combine(runs[name]) for name in OPTIMIZERS]
    return parameters, add_ratios(rows)


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with work_directory(args.keep, "stage_throughput-") as root:
        parameters, rows = run_all(args, root)
    verdicts = compare(rows)
    print()
    print_table(rows)
    print()
    print_verdicts(verdicts)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"world_size": WORLD_SIZE, "steps": args.steps, "warmup": args.warmup,
                       "repeats": args.repeats, "model": model_config(args.hidden, args.layers),
                       "parameters": parameters,
                       "rows": rows, "verdicts": verdicts}, f, indent=2)


if __name__ == "__main__":
    main()
