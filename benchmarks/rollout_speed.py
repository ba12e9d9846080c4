"""Rollout speed: Hugging Face `generate` against vLLM on the same policy and prompts, and the demo's
ReMax and GRPO end to end with each rollout engine.

**Generation** (fp32, CPU, one process per model holding both engines): the pipeline's own rollout
engines, `HfRollouts` (`generate` on the model's module) and `VllmRollouts` (an in-process vLLM engine
from `create_llm`, streamed that same module's weights before its first call), get the same left-padded
prompt batches and the same `Sampling`, one engine call per batch:

- the demo's SFT policy on the 64 held-out demo prompts (data/demo/eval_prompts.jsonl) in the ReMax
  config's micro-batches, sampled, greedy, and both in one call as ReMax's rollout asks (vLLM serves
  them as one batch, HF calls `generate` twice), up to its `max_new_tokens` (eos ends a response, as
  in training);
- a ~110M-parameter Llama with random weights (hidden 768, 12 layers, 12 heads, vocab 32000, tied
  embeddings), a batch of prompts of random ids, sampled, exactly N new tokens: both engines mask the
  eos until the N-th token (HF `min_new_tokens`, vLLM `min_tokens`, each set to N on top of the
  engine's own settings), so no response ends early on either side (every response's length is
  checked).

New tokens are counted from the responses each engine returned. Each engine's first pass (vLLM: the
weight stream and first-call allocations; HF: its first-call allocations) is left out; then the two
alternate, and the table gives the median over the repeats and their range. One torch thread by
default, as each of the demo's 2 ranks has: on a shared machine two threads stall on each other.

**End to end** (`--end-to-end`; ~18 minutes on 2 shared cores): configs/tiny/{remax,grpo}.yaml from the
demo's SFT and reward exports on 2 CPU ranks through the demo's launch scripts, `rollout.engine=hf` and
`vllm`, seeds 0, 1, 2: per run the median logged `step_time` (rollout and training; evaluations and
checkpoints fall outside it) and their sum, the wall time and the last held-out greedy gold reward
(`eval/gold_reward`); per engine
their mean and std over the seeds, and whether the engines' gold rewards differ beyond seed noise (a
two-sample t-test at 5%). Under one seed the engines draw different tokens (different generators), so
only their distributions compare.

    python -m benchmarks.rollout_speed [--quick] [--end-to-end] [--skip-generation] [--sft DIR] [--reward DIR]
        [--repeats 3] [--demo-repeats 10] [--batch 16] [--new-tokens 128] [--threads 1] [--seeds 0,1,2]
        [--stages remax,grpo] [--max-steps N] [--keep DIR] [--json PATH]

Without `--sft` (and, for `--end-to-end`, `--reward`) the demo's SFT (and reward) model is trained
first with configs/tiny/sft_full.yaml (reward.yaml) on 2 ranks, as training_scripts/demo.sh does.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Optional

from benchmarks.stage_throughput import launch_script as launch
from benchmarks.stage_throughput import work_directory
from pipeline.seeds import compare_seeds, mean_std

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
ENGINES = ("hf", "vllm")  # hf first: the baseline every ratio divides by
STAGES = {"remax": "training_scripts/po/remax/run_remax.sh", "grpo": "training_scripts/po/grpo/run_grpo.sh"}
DEMO_CONFIG = "configs/tiny/remax.yaml"  # the demo policy's prompts, lengths, sampling and micro-batch
RANDOM_LLAMA = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=True)
QUICK_LLAMA = dict(RANDOM_LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
PROMPT_TOKENS = 32              # each random-id prompt
LAUNCH_TIMEOUT_S = 1800
WORKER_TIMEOUT_S = 1800


# ---- generation: the worker (one process per model) ------------------------------------------------

class UnshardedActor:
    """Stands in for the training engine both rollout engines read: a plain module, never stepped."""

    def __init__(self, module):
        self.module, self.global_steps = module, 0

    def zero_optimization_stage(self) -> int:
        return 0

    def eval(self):
        self.module.eval()


def rollout_classes() -> tuple:
    """(HF, vLLM) rollout engine classes: the pipeline's own."""
    from pipeline.rl.rollout import HfRollouts
    from pipeline.rl.vllm_engine import VllmRollouts

    return HfRollouts, VllmRollouts


class IdTokenizer:
    """The two ids the rollout engines read, for a model that has no tokenizer: prompts are token ids."""

    def __init__(self, eos_token_id: int, pad_token_id: int):
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id


def random_prompt_batch(rows: int, length: int, vocab_size: int, seed: int) -> dict:
    """`rows` prompts of `length` random ids (no padding: every row is as long)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (rows, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def demo_prompt_batches(model_dir: str, tokenizer) -> tuple:
    """(left-padded batches of the demo's held-out prompts in the ReMax config's micro-batches, its
    Sampling, its `data.max_length`), tokenised as the ReMax stage does."""
    from pipeline.config import load_config
    from pipeline.data import prepare_file
    from pipeline.generation import collate_with_prompts
    from pipeline.rl.stage import sampling_of
    from stages.remax import RemaxConfig

    config = load_config(RemaxConfig, str(REPO_ROOT / DEMO_CONFIG),
                         [f"model.path={model_dir}", f"data.path={REPO_ROOT / 'data/demo/prompts.jsonl'}"])
    prompts, _ = prepare_file(config.data, tokenizer, str(REPO_ROOT / config.remax.eval_prompts_path))
    rows, size = list(prompts), config.engine.micro_batch_size
    batches = [collate_with_prompts(rows[start:start + size], tokenizer.pad_token_id)
               for start in range(0, len(rows), size)]
    return batches, sampling_of(config.remax), config.data.max_length


def timed_pass(engine, batches: list, samplings: list, key: tuple) -> dict:
    """One engine call per batch for all of `samplings`: seconds, new tokens, and each response's tokens
    (batch by batch, sampling by sampling)."""
    import torch

    torch.manual_seed(zlib.crc32(repr(key).encode()))  # HF samples from torch's generator; vLLM seeds from `key`
    started = time.perf_counter()
    generated = [engine.generate(batch, samplings, key=(*key, index)) for index, batch in enumerate(batches)]
    seconds = time.perf_counter() - started
    responses = []
    for batch, outs in zip(batches, generated):
        for out in outs:
            tokens = out.sequences[:, batch["input_ids"].shape[1]:]  # (B, T)
            responses += [row[keep.bool()].tolist() for row, keep in zip(tokens, out.mask)]
    return {"seconds": seconds, "new_tokens": sum(len(tokens) for tokens in responses), "responses": responses}


def generation_worker(spec_path: str, out_path: str) -> None:
    """Loads the model of `spec` once as a module and once into vLLM, times `repeats` + 1 passes of each
    engine per sampling mode (alternating), writes the passes to `out_path`."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])  # before vLLM: its CPU worker turns torch.set_num_threads into a no-op
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_tokenizer
    from pipeline.config import ModelConfig
    from pipeline.rl.rollout import Sampling
    from pipeline.rl.sections import RolloutSection
    from pipeline.rl.vllm_engine import create_llm

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    actor = UnshardedActor(model)
    if spec["kind"] == "demo":
        tokenizer = load_tokenizer(ModelConfig(path=spec["model"]))
        batches, sampling, max_model_len = demo_prompt_batches(spec["model"], tokenizer)
        # ReMax's rollout asks for both in one call: vLLM serves them as one batch, HF generates twice.
        modes = {"sampled": [sampling], "greedy": [sampling.as_greedy()],
                 "sampled + greedy": [sampling, sampling.as_greedy()]}
    else:
        vocab = model.config.vocab_size
        tokenizer = IdTokenizer(eos_token_id=model.config.eos_token_id, pad_token_id=0)
        batches = [random_prompt_batch(spec["batch"], PROMPT_TOKENS, vocab, seed=0)]
        # Every response runs to the budget (the eos held back on both sides), so both generate as many tokens.
        modes = {"sampled": [Sampling(spec["new_tokens"], min_new_tokens=spec["new_tokens"])]}
        max_model_len = PROMPT_TOKENS + spec["new_tokens"]
    rollout = RolloutSection(engine="vllm", kv_cache_gib=spec["kv_cache_gib"])
    threads_before = torch.get_num_threads()
    started = time.perf_counter()
    llm = create_llm(spec["model"], rollout, torch.float32, max_model_len, seed=0)
    engine_start_s = time.perf_counter() - started
    hf_class, vllm_class = rollout_classes()
    engines = {"hf": hf_class(actor, tokenizer), "vllm": vllm_class(actor, tokenizer, llm, rollout, seed=0)}
    passes = {mode: {name: [] for name in ENGINES} for mode in modes}
    for mode, samplings in modes.items():
        for repeat in range(spec["repeats"] + 1):  # pass 0: warm-up, left out of the figures
            order = ENGINES if repeat % 2 == 0 else ENGINES[::-1]
            for name in order:
                result = timed_pass(engines[name], batches, samplings, ("bench", mode, repeat))
                passes[mode][name].append(result)
                print(f"    {spec['kind']} {mode} {name} pass {repeat}: {result['new_tokens']} tokens in "
                      f"{result['seconds']:.2f} s", flush=True)
    budgets = {"prompts": sum(len(batch["input_ids"]) for batch in batches),
               "prompt_tokens": sum(int(batch["attention_mask"].sum()) for batch in batches),
               "max_new_tokens": {mode: samplings[0].max_new_tokens for mode, samplings in modes.items()},
               "fixed_length": spec["kind"] == "random"}
    Path(out_path).write_text(json.dumps({
        "kind": spec["kind"], "parameters": sum(p.numel() for p in model.parameters()), "budgets": budgets,
        "threads": [threads_before, torch.get_num_threads()], "vllm_start_s": engine_start_s, "passes": passes}))


# ---- generation: the figures ---------------------------------------------------------------------

def rate_summary(passes: list, warmup: int = 1) -> dict:
    """New tokens/s of each pass after the first `warmup`: median, min, max, and the passes counted."""
    rates = [run["new_tokens"] / run["seconds"] for run in passes[warmup:]]
    return {"tokens_per_s": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": len(rates),
            "new_tokens": statistics.median(run["new_tokens"] for run in passes[warmup:]),
            "warmup_s": sum(run["seconds"] for run in passes[:warmup])}


def generation_rows(result: dict, label: str) -> list:
    """One row per sampling mode of a worker's result: each engine's rate summary and vLLM / HF. For
    greedy decoding also the share of prompts whose responses are token for token equal (fp32: expected
    all, or nearly: near-ties may break differently in different kernels)."""
    rows = []
    for mode, by_engine in result["passes"].items():
        row = {"model": label, "mode": mode, **{name: rate_summary(by_engine[name]) for name in ENGINES}}
        row["ratio"] = row["vllm"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
        if mode == "greedy":
            hf, vllm = by_engine["hf"][-1]["responses"], by_engine["vllm"][-1]["responses"]
            row["greedy_equal"] = sum(a == b for a, b in zip(hf, vllm)) / len(hf)
        rows.append(row)
    return rows


def check_lengths(result: dict) -> list:
    """Problems with the responses of a fixed-length run: any response not exactly `max_new_tokens` long."""
    if not result["budgets"]["fixed_length"]:
        return []
    problems = []
    for mode, by_engine in result["passes"].items():
        wanted = result["budgets"]["max_new_tokens"][mode]
        for name, passes in by_engine.items():
            lengths = {len(tokens) for run in passes for tokens in run["responses"]}
            if lengths != {wanted}:
                problems.append(f"{result['kind']} {mode} {name}: response lengths {sorted(lengths)}, not {wanted}")
    return problems


def format_table(header: tuple, lines: list, left: int = 1) -> str:
    """Columns padded to their widest cell; the first `left` columns left-aligned, the rest right."""
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))).rstrip()
                     for line in [header] + lines)


def generation_table(rows: list) -> str:
    header = ("model", "mode", "new tokens / pass", "HF tok/s", "HF range", "vLLM tok/s", "vLLM range",
              "vLLM / HF", "greedy equal")
    lines = []
    for row in rows:
        hf, vllm = row["hf"], row["vllm"]
        equal = f"{row['greedy_equal']:.0%}" if "greedy_equal" in row else "-"
        lines.append((row["model"], row["mode"], f"{hf['new_tokens']:.0f} / {vllm['new_tokens']:.0f}",
                      f"{hf['tokens_per_s']:.0f}", f"{hf['min']:.0f}-{hf['max']:.0f}", f"{vllm['tokens_per_s']:.0f}",
                      f"{vllm['min']:.0f}-{vllm['max']:.0f}", f"{row['ratio']:.2f}", equal))
    return format_table(header, lines, left=2)


# ---- end to end: the figures --------------------------------------------------------------------

def read_metrics(run_dir: Path) -> list:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_summary(rows: list) -> dict:
    """A run's median `step_time` over its logged steps, their sum (`train_s`: the run's time in steps,
    without start-up, evaluations and checkpoints), its steps, and its last `eval/gold_reward` and
    `eval/reward` (held-out, greedy).

    Raises:
        ValueError: the run logged no step or no gold reward.
    """
    steps = [row for row in rows if "step_time" in row]
    evals = sorted((row for row in rows if "eval/gold_reward" in row), key=lambda row: row["step"])
    if not steps or not evals:
        raise ValueError(f"{len(steps)} logged steps and {len(evals)} evaluations with a gold reward")
    return {"steps": len(steps), "step_time": statistics.median(row["step_time"] for row in steps),
            "train_s": sum(row["step_time"] for row in steps), "gold_reward": evals[-1]["eval/gold_reward"],
            "eval_reward": evals[-1]["eval/reward"],
            "eval_step": evals[-1]["step"]}


def end_to_end_rows(runs: list) -> list:
    """Per stage and engine: mean and std over seeds of the runs' median step time, time in steps, wall
    time and last gold reward; each vLLM row carries the comparison with HF's gold rewards and its step-time ratio."""
    rows = []
    for stage in dict.fromkeys(run["stage"] for run in runs):
        by_engine = {}
        for engine in ENGINES:
            done = [run for run in runs if run["stage"] == stage and run["engine"] == engine and "failed" not in run]
            if not done:
                continue
            step, train, wall, gold = (mean_std([run[name] for run in done])
                                       for name in ("step_time", "train_s", "wall_s", "gold_reward"))
            by_engine[engine] = {"stage": stage, "engine": engine, "seeds": [run["seed"] for run in done],
                                 "steps": done[0]["steps"], "step_time": step, "train_s": train, "wall_s": wall,
                                 "gold_reward": gold,
                                 "gold_values": [run["gold_reward"] for run in done]}
        if set(by_engine) == set(ENGINES):
            hf, vllm = by_engine["hf"], by_engine["vllm"]
            vllm["step_time_ratio"] = vllm["step_time"][0] / hf["step_time"][0]
            vllm["gold_vs_hf"] = compare_seeds(hf["gold_values"], vllm["gold_values"])
        rows += by_engine.values()
    return rows


def end_to_end_table(rows: list) -> str:
    header = ("stage", "engine", "seeds", "steps", "step s, mean ± std", "x HF", "in steps s", "run wall s",
              "gold reward",
              "per seed", "vs HF")
    lines = []
    for row in rows:
        comparison = row.get("gold_vs_hf")
        if comparison is None:
            verdict = "-"
        elif comparison["within_noise"] is None:
            verdict = f"{comparison['difference']:+.3f} (no seed spread to compare with)"
        else:
            verdict = (f"{comparison['difference']:+.3f}, t {comparison['t']:+.2f} "
                       f"({'within' if comparison['within_noise'] else 'BEYOND'} seed noise)")
        lines.append((row["stage"], row["engine"], ",".join(map(str, row["seeds"])), str(row["steps"]),
                      f"{row['step_time'][0]:.3f} ± {row['step_time'][1]:.3f}",
                      f"{row['step_time_ratio']:.2f}" if "step_time_ratio" in row else "-",
                      f"{row['train_s'][0]:.0f} ± {row['train_s'][1]:.0f}",
                      f"{row['wall_s'][0]:.0f} ± {row['wall_s'][1]:.0f}",
                      f"{row['gold_reward'][0]:.3f} ± {row['gold_reward'][1]:.3f}",
                      " ".join(f"{value:.3f}" for value in row["gold_values"]), verdict))
    return format_table(header, lines, left=3)


# ---- launching --------------------------------------------------------------------------------------

def log_tail(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-3000:] if path.is_file() else ""


def demo_model(kind: str, root: Path, sft_dir: Optional[Path] = None) -> Path:
    """Trains the demo's SFT (`kind` sft) or reward model (from `sft_dir`) into `root`; returns its export.

    Raises:
        RuntimeError: the run failed (with its output's tail).
    """
    run_dir = root / kind
    script, config = {"sft": ("training_scripts/sft/run_sft_full.sh", "configs/tiny/sft_full.yaml"),
                      "reward": ("training_scripts/reward/run_reward.sh", "configs/tiny/reward.yaml")}[kind]
    overrides = [f"output_dir={run_dir}", "checkpoint.overwrite=true"]
    if kind == "reward":
        overrides.append(f"model.path={sft_dir}")
    started = time.perf_counter()
    failure = launch(script, config, overrides, root / f"{kind}.log", LAUNCH_TIMEOUT_S)
    if failure:
        raise RuntimeError(f"the demo {kind} run failed ({failure}):\n{log_tail(root / f'{kind}.log')}")
    print(f"  trained the demo {kind} model in {time.perf_counter() - started:.0f} s: {run_dir / 'final'}", flush=True)
    return run_dir / "final"


def save_random_llama(directory: Path, shape: dict) -> Path:
    """A Llama of `shape` with seeded random weights, fp32 safetensors (eos: the last id)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    vocab = shape["vocab_size"]
    config = LlamaConfig(**shape, max_position_embeddings=1024, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                         pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def kv_cache_gib(shape: dict, rows: int, tokens: int) -> float:
    """The fp32 KV cache the rows need, doubled for headroom, at least vLLM's CPU default here (1 GiB)."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    need = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 4 * rows * tokens
    return max(1.0, 2 * need / 2**30)


def run_generation_worker(spec: dict, root: Path) -> dict:
    """Runs `generation_worker` in a fresh process (each model its own vLLM engine and thread pool).

    Raises:
        RuntimeError: the worker failed (with its output's tail).
    """
    name = spec["kind"]
    spec_path, out_path, log_path = root / f"{name}.spec.json", root / f"{name}.out.json", root / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    code = ("import sys; from benchmarks.rollout_speed import generation_worker; "
            "generation_worker(sys.argv[1], sys.argv[2])")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-c", code, str(spec_path), str(out_path)], cwd=REPO_ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        try:
            for line in process.stdout:
                print(line, end="", flush=True)
            code = process.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            code = "timed out"
    if code != 0 or not out_path.is_file():
        raise RuntimeError(f"the {name} generation worker failed ({code}):\n{log_tail(log_path)}")
    return json.loads(out_path.read_text())


# ---- main -------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny version: 2-layer random Llama, 4 x 16 new tokens, 1 repeat (demo: 2); end to "
                             "end 4 steps, seed 0")
    parser.add_argument("--end-to-end", action="store_true", help="also the demo ReMax and GRPO with each engine")
    parser.add_argument("--skip-generation", action="store_true", help="only the end-to-end runs")
    parser.add_argument("--sft", type=Path, help="the demo's SFT export (default: trained here first)")
    parser.add_argument("--reward", type=Path, help="the demo's reward export (default: trained here first)")
    parser.add_argument("--repeats", type=int, help="random Llama: timed passes per engine after the warm-up "
                                                   "(default 3)")
    parser.add_argument("--demo-repeats", type=int, help="demo policy: the same (default 10; a pass takes ~0.1 s)")
    parser.add_argument("--batch", type=int, help="random-Llama prompts per call (default 16)")
    parser.add_argument("--new-tokens", type=int, help="random-Llama new tokens per response (default 128)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the generation process (default 1, as each of the demo's 2 ranks "
                             "has on 2 cores: on a shared machine, 2 threads stall on each other's barriers)")
    parser.add_argument("--seeds", help="end-to-end seeds, comma-separated (default 0,1,2)")
    parser.add_argument("--stages", default=",".join(STAGES), help="end-to-end stages, comma-separated: remax, grpo")
    parser.add_argument("--max-steps", type=int, help="end-to-end training.max_steps (default: the configs' 60)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep models, run dirs and logs here")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON here")
    args = parser.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (1 if quick else 3)
    args.demo_repeats = args.demo_repeats or (2 if quick else 10)
    args.batch = args.batch or (4 if quick else 16)
    args.new_tokens = args.new_tokens or (16 if quick else 128)
    args.max_steps = args.max_steps or (4 if quick else None)
    try:
        args.seeds = [int(seed) for seed in (args.seeds or ("0" if quick else "0,1,2")).split(",")]
    except ValueError:
        parser.error(f"--seeds is {args.seeds!r}; give comma-separated integers, e.g. 0,1,2")
    args.stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    problems = [f"--stages names {name!r}; use remax and/or grpo" for name in args.stages if name not in STAGES]
    problems += [f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be positive"
                for name in ("repeats", "demo_repeats", "batch", "new_tokens", "threads") if getattr(args, name) <= 0]
    if args.max_steps is not None and args.max_steps <= 0:
        problems.append(f"--max-steps is {args.max_steps}; it must be positive")
    if args.skip_generation and not args.end_to_end:
        problems.append("--skip-generation leaves nothing to run without --end-to-end")
    problems += [f"--{name} {path} holds no config.json; give a Hugging Face export (a run's final/)"
                 for name, path in (("sft", args.sft), ("reward", args.reward))
                 if path is not None and not (path / "config.json").is_file()]
    if problems:
        parser.error("; ".join(problems))
    return args


def generation_part(args, root: Path, sft_dir: Path) -> tuple:
    """(table rows, worker results) of the demo policy and the random Llama."""
    shape = QUICK_LLAMA if args.quick else RANDOM_LLAMA
    random_dir = save_random_llama(root / "random_llama", shape)
    results = {
        "demo": run_generation_worker({"kind": "demo", "model": str(sft_dir), "threads": args.threads,
                                       "repeats": args.demo_repeats, "kv_cache_gib": 1.0}, root),
        "random": run_generation_worker({"kind": "random", "model": str(random_dir), "threads": args.threads,
                                         "repeats": args.repeats, "batch": args.batch,
                                         "new_tokens": args.new_tokens,
                                         "kv_cache_gib": kv_cache_gib(shape, args.batch,
                                                                      PROMPT_TOKENS + args.new_tokens)}, root)}
    problems = [problem for result in results.values() for problem in check_lengths(result)]
    if problems:
        raise RuntimeError("responses of the wrong length: " + "; ".join(problems))
    random_label = f"Llama {results['random']['parameters'] / 1e6:.0f}M random, {args.batch} x {args.new_tokens}"
    rows = (generation_rows(results["demo"], f"demo SFT {results['demo']['parameters'] / 1e6:.1f}M")
            + generation_rows(results["random"], random_label))
    return rows, results


def end_to_end_run(stage: str, engine: str, seed: int, root: Path, models: tuple, max_steps: Optional[int]) -> dict:
    """One demo run of `stage` on `engine` from `models` (SFT export, reward export): its summary, wall
    time and the machine's load around it, or `failed` with the reason."""
    sft_dir, reward_dir = models
    run_dir = root / f"{stage}-{engine}-seed{seed}"
    overrides = [f"output_dir={run_dir}", f"model.path={sft_dir}", f"{stage}.reward_model_path={reward_dir}",
                 f"seed={seed}", f"rollout.engine={engine}", "checkpoint.overwrite=true"]
    if max_steps:
        overrides.append(f"training.max_steps={max_steps}")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    failure = launch(STAGES[stage], f"configs/tiny/{stage}.yaml", overrides, root / f"{run_dir.name}.log",
                     LAUNCH_TIMEOUT_S)
    # The 1-minute load average before and after: how much of the 2 cores other jobs were taking.
    run = {"stage": stage, "engine": engine, "seed": seed, "wall_s": time.perf_counter() - started,
           "load": [load_before, os.getloadavg()[0]]}
    if failure is None:
        try:
            return {**run, **run_summary(read_metrics(run_dir))}
        except ValueError as error:
            failure = f"{run_dir / 'metrics.jsonl'}: {error}"
    print(f"\n{run_dir.name} FAILED ({failure}); last output:\n{log_tail(root / f'{run_dir.name}.log')}\n", flush=True)
    return {**run, "failed": failure}


def end_to_end_part(args, root: Path, sft_dir: Path, reward_dir: Path) -> list:
    """Every (stage, seed, engine) run, the engines taking turns to go first."""
    runs = []
    for stage in args.stages:
        for index, seed in enumerate(args.seeds):
            for engine in (ENGINES if index % 2 == 0 else ENGINES[::-1]):
                run = end_to_end_run(stage, engine, seed, root, (sft_dir, reward_dir), args.max_steps)
                if "failed" not in run:
                    print(f"  {stage} {engine} seed {seed}: {run['steps']} steps, median step "
                          f"{run['step_time']:.3f} s, gold {run['gold_reward']:.3f}, {run['wall_s']:.0f} s, "
                          f"load {run['load'][0]:.1f} -> {run['load'][1]:.1f}", flush=True)
                runs.append(run)
    return runs


def run_all(args, root: Path) -> dict:
    report = {"threads": args.threads, "repeats": args.repeats, "demo_repeats": args.demo_repeats,
              "world_size": WORLD_SIZE}
    sft_dir = args.sft.resolve() if args.sft else demo_model("sft", root)
    if not args.skip_generation:
        print(f"generation: {args.demo_repeats} (demo) and {args.repeats} (random Llama) timed passes per engine "
              f"after 1 warm-up pass, fp32, {args.threads} torch thread(s); work dir {root}", flush=True)
        rows, results = generation_part(args, root, sft_dir)
        for result in results.values():
            for mode in result["passes"].values():
                for passes in mode.values():
                    for run in passes:
                        del run["responses"]  # only for the checks above; the JSON keeps the figures
        report["generation"] = {"rows": rows, "results": results}
        print("\n" + generation_table(rows) + "\n", flush=True)
        print("vLLM engine start (s): " + ", ".join(f"{kind} {result['vllm_start_s']:.1f}"
                                                   for kind, result in results.items()), flush=True)
        print("torch threads before / after the vLLM engine started: " + ", ".join(
            f"{kind} {result['threads'][0]} / {result['threads'][1]}" for kind, result in results.items()), flush=True)
    if args.end_to_end:
        reward_dir = args.reward.resolve() if args.reward else demo_model("reward", root, sft_dir)
        steps = args.max_steps or "the configs' 60"
        print(f"\nend to end: {', '.join(args.stages)} x {ENGINES} x seeds {args.seeds}, {WORLD_SIZE} ranks, "
              f"training.max_steps {steps}", flush=True)
        runs = end_to_end_part(args, root, sft_dir, reward_dir)
        rows = end_to_end_rows(runs)
        report["end_to_end"] = {"max_steps": args.max_steps, "runs": runs, "rows": rows}
        print("\n" + end_to_end_table(rows), flush=True)
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with work_directory(args.keep, "rollout_speed-") as root:
        report = run_all(args, root)
    report["wall_s"] = time.perf_counter() - started
    print(f"\ntotal wall time {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
