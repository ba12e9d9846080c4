"""Measured per-rank memory against `pipeline.plan`'s peak, on 2 CPU ranks.

    python -m benchmarks.memory_vs_plan [--steps 3] [--keep DIR] [--only 'sft ZeRO-3,ppo ZeRO-2']

Builds a 32-layer narrow Llama (~81M parameters, vocab 32000, bf16 safetensors) and a reward model
from it in a temporary directory, then runs SFT at ZeRO-2 and ZeRO-3, reward training, ReMax
(reference and reward model at ZeRO-3) and PPO (the same, plus a critic trained from the reward
model) for a few steps each, one after another in the same 2 real DeepSpeed CPU ranks (one launch).
Every rank samples its own anonymous resident memory (RssAnon, /proc/self/status) every 5 ms from just
before a stage loads its models to the end of its steps; the bf16 weights stay memory-mapped from
the safetensors files, which plain RSS would count and RssAnon does not. The table gives per rank the
peak growth, the plan's peak for the same config, and their ratio.

Log-probabilities take the LM head 64 tokens at a time (`model.logits_chunk`, scaled to these batches
as the model is to a 7B one); SFT and PPO run again with the whole logits at once (`logits_chunk: 0`),
and a second table gives each rank's drop in peak from those runs to the chunked ones, measured and
planned.

The growth is the peak less the memory at the run's start. What a process pays once (imports, among
them the ~45 MiB of `torch.compile` machinery DeepSpeed imports when it first meets an optimizer,
libraries' lazily built tables) is paid before the measured runs by a warm-up: the same stages on a
tiny model, one step each. tests/benchmarks/test_memory_vs_plan.py runs this at the suite's size.

What the CPU measurement validates: the bytes the plan counts (model states, frozen models, the
logits and loss buffers, the saved activations, DeepSpeed's buckets and gathered ZeRO-3 weights, the KV
cache) against what the ranks really allocate, with glibc returning freed blocks at once
(MALLOC_MMAP_THRESHOLD_). It does not validate the GPU's caching allocator (fragmentation and
reserved-but-free blocks come on top there; leave ~10% headroom) or flash-attention kernels; CPU
SDPA runs its own fused kernel, with no T x T matrix as on GPU. The final export is not measured.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from pipeline.run import run_as_main
from pipeline.stages import STAGES

REPO_ROOT = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
# ReMax with vLLM generating (where it is installed): the engine's weights copy and a 0.25 GiB KV cache.
VLLM_ROLLOUT = {"engine": "vllm", "kv_cache_gib": 0.25}
MIB = 2**20
CHUNK = 64                # tokens of logits at once in the runs (model.logits_chunk)
WHOLE_LOGITS = " whole logits"  # names the twin of a run with `logits_chunk: 0`
WORDS = ("the cat sat on a mat dog ran to park red blue green big small one two three four five yes no good bad "
         "what is how why where when who which tree house river stone cloud rain").split()
# glibc hands every block of 64 KiB or more back to the kernel when freed, so RssAnon follows live
# tensors instead of keeping the heap's high-water mark.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def rss_anon() -> int:
    """Anonymous resident bytes of this process (file-backed mappings such as mmapped weights excluded)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.baseline, self.peak, self.stopped = interval, rss_anon(), 0, threading.Event()

    def run(self):
        while not self.stopped.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        self.peak = max(self.peak, rss_anon())
        return self.peak - self.baseline


# ---- inside each rank ------------------------------------------------------------------------------

def measure(module: str, argv: list) -> dict:
    """Runs one stage command in this rank and returns its exit code and the peak growth of this rank's
    RssAnon over its value when the command started."""
    gc.collect()  # the previous run's engines go before this one's baseline is taken
    sampler = PeakSampler()
    sampler.start()
    code = run_as_main(module, argv)
    return {"exit": code, "growth_bytes": sampler.stop()}


def rank_main(spec_path: str, out: str) -> None:
    """Runs the spec's warm-up commands, then measures each of its runs; every rank writes its own
    results to OUT.rank<R>.json."""
    from pipeline.engine import init_distributed
    from pipeline.rundir import RunDirectory

    RunDirectory.export = lambda self, *args, **kwargs: None  # the final export is not part of the plan
    init_distributed()
    spec = json.loads(Path(spec_path).read_text())
    warmup = [dict(name=run["name"], **measure(run["module"], run["argv"])) for run in spec["warmup"]]
    failed = [run["name"] for run in warmup if run["exit"]]
    if failed:
        raise SystemExit(f"warm-up runs failed: {failed}")
    results = [dict(name=run["name"], **measure(run["module"], run["argv"])) for run in spec["runs"]]
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"rank": rank, "warmup": warmup, "runs": results}))


# ---- models, data and configs ------------------------------------------------------------------------

def narrow_llama_config(**overrides):
    from transformers import LlamaConfig

    # 32 layers of width 384 (6 heads of 64), MLP 1024, vocab 32000: 81M parameters.
    values = dict(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=32,
                  num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaConfig(**{**values, **overrides})


def build_models(root: Path, llama_config) -> tuple:
    """A bf16 Llama of `llama_config` and a reward model from its backbone, each with the word tokenizer,
    saved under `root`; returns (policy dir, reward dir, parameters)."""
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.demo_task import train_tokenizer
    from pipeline.models import RewardModel

    policy, reward = root / "policy", root / "reward"
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config).to(torch.bfloat16)
    model.save_pretrained(policy)
    train_tokenizer([" ".join(WORDS)], policy)
    RewardModel(model.model).save_pretrained(reward)
    train_tokenizer([" ".join(WORDS)], reward)
    return policy, reward, sum(p.numel() for p in model.parameters())


def write_data(root: Path, max_length: int = 256, max_prompt_length: int = 96) -> dict:
    """Rows of one word per token that just fit `max_length` (prompts: `max_prompt_length`), so every
    batch is as long as the plan assumes (rows over the limit would be dropped, not cut)."""
    import random

    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    prompt_words = max_prompt_length * 5 // 8
    answer_words = max_length - prompt_words - 6  # room for <bos>, <eos>
    files = {"sft": [{"prompt": text(prompt_words), "response": text(answer_words)} for _ in range(64)],
             "pairs": [{"prompt": text(prompt_words), "chosen": text(answer_words), "rejected": text(answer_words)}
                       for _ in range(64)],
             "prompts": [{"prompt": text(max_prompt_length - 4)} for _ in range(64)]}
    paths = {}
    for name, rows in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def stage_values(stage: str, policy: Path, reward: Path, data: dict, *, zero: int, optimizer: str,
                 checkpointing: bool = False, micro_batch: int = 2, steps: int = 3, max_length: int = 256,
                 max_prompt_length: int = 96, new_tokens: int = 64, rollout: Optional[dict] = None,
                 packing_tokens: Optional[int] = None, logits_chunk: int = CHUNK) -> dict:
    """A run config (as YAML values) of `stage`: SFT and reward on rows of `max_length` (packed into
    `micro_batch` packs of `packing_tokens` when given); ReMax and PPO on prompts of `max_prompt_length`
    with `new_tokens` generated, reference and reward model at ZeRO-3 (PPO: a critic from the reward
    model, trained like the actor, two updates per rollout as shipped); the LM head `logits_chunk` tokens
    at a time."""
    values = dict(seed=0, training={"max_steps": steps, "eval_at_start": False},
                  logging={"progress_bar": False, "tensorboard": False}, checkpoint={"every_steps": 10**6},
                  model={"path": str(policy), "gradient_checkpointing": checkpointing, "logits_chunk": logits_chunk},
                  optim={"name": optimizer, "lr": 1e-5},
                  engine={"zero_stage": zero, "precision": "bf16", "micro_batch_size": micro_batch},
                  data={"path": str(data["sft"]), "format": "sft", "max_length": max_length,
                        "max_prompt_length": max_prompt_length, "eval_fraction": 0.1})
    if packing_tokens is not None:
        values["data"].update(packing=True, packing_tokens=packing_tokens)
    if stage == "reward":
        values["data"].update(path=str(data["pairs"]), format="pairwise")
    elif stage in ("remax", "ppo"):
        values["data"].update(path=str(data["prompts"]), format="prompt", max_length=max_prompt_length + new_tokens)
        values[stage] = {"reward_model_path": str(reward), "max_new_tokens": new_tokens, "ref_zero_stage": 3,
                         "reward_zero_stage": 3}
        if stage == "ppo":
            values[stage].update(num_samples=1, critic_init="reward")
        if rollout:
            values["rollout"] = rollout
    return values


def write_spec(root: Path, runs: dict, warmup: dict) -> Path:
    """Writes each run's config (`runs`, `warmup`: name -> (stage, values)) and the spec the ranks read."""
    import yaml

    def command(name: str, stage: str, values: dict) -> dict:
        slug = "".join(c if c.isalnum() else "_" for c in name)
        path = root / f"{slug}.yaml"
        path.write_text(yaml.safe_dump({"output_dir": str(root / "runs" / slug), **values}))
        return {"name": name, "stage": stage, "config": str(path), "module": STAGES[stage].module,
                "argv": ["--config", str(path)]}

    spec = {"warmup": [command(f"warm-up {name}", *run) for name, run in warmup.items()],
            "runs": [command(name, *run) for name, run in runs.items()]}
    path = root / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def warmup_runs(root: Path) -> dict:
    """SFT at ZeRO-2, reward and PPO at ZeRO-3 (generation, frozen models, a critic) for one step on a
    2-layer Llama of width 64, Adam-mini: what a process pays once (imports, Adam-mini's kernel,
    DeepSpeed's first-use set-up; 250 MiB in all) is paid here, not by the first measured run."""
    policy, reward, _ = build_models(root / "warmup", narrow_llama_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
        vocab_size=64))
    data = write_data(root / "warmup", max_length=32, max_prompt_length=16)
    options = dict(optimizer="adam_mini", steps=1, max_length=32, max_prompt_length=16, new_tokens=8)
    runs = {"sft ZeRO-2": ("sft", stage_values("sft", policy, reward, data, zero=2, **options)),
            "reward ZeRO-3": ("reward", stage_values("reward", policy, reward, data, zero=3, **options)),
            "ppo ZeRO-3": ("ppo", stage_values("ppo", policy, reward, data, zero=3, **options))}
    if HAS_VLLM:  # vLLM's imports and first engine's set-up, with a KV cache no measured run asks for
        runs["remax vLLM"] = ("remax", stage_values("remax", policy, reward, data, zero=2, rollout=dict(
            engine="vllm", kv_cache_gib=0.125), **options))
    return runs


# ---- the driver -------------------------------------------------------------------------------------

def planned_peak(config_path, world_size: int) -> int:
    """The plan's peak per rank for the config's optimizer and ZeRO stage."""
    from pipeline.plan import config_plan_rows

    config, rows = config_plan_rows(str(config_path), [world_size], gloo=True)  # the ranks run on CPU
    return next(row["total_bytes"] for row in rows
                if (row["optimizer"], row["zero_stage"]) == (config.optim.name, config.engine.zero_stage))


def compare(spec_path: Path, out: Path, world_size: int) -> list:
    """Each rank's measured growth per run next to the plan's peak for its config."""
    spec = json.loads(spec_path.read_text())
    plans = {run["name"]: planned_peak(run["config"], world_size) for run in spec["runs"]}
    results = []
    for rank in range(world_size):
        for run in json.loads(Path(f"{out}.rank{rank}.json").read_text())["runs"]:
            plan = plans[run["name"]]
            growth = run["growth_bytes"]
            results.append({"run": run["name"], "rank": rank, "exit": run["exit"], "measured_bytes": growth,
                            "plan_bytes": plan, "ratio": growth / plan})
    return results


def logits_drops(results: list) -> list:
    """Per run with a whole-logits twin (named `run + WHOLE_LOGITS`) and rank: the peak the chunked logits
    save, measured and planned."""
    by_name = {(r["run"], r["rank"]): r for r in results}
    drops = []
    for (name, rank), whole in by_name.items():
        chunked = by_name.get((name.removesuffix(WHOLE_LOGITS), rank)) if name.endswith(WHOLE_LOGITS) else None
        if chunked is not None:
            drops.append({"run": chunked["run"], "rank": rank,
                          "measured_drop_bytes": whole["measured_bytes"] - chunked["measured_bytes"],
                          "plan_drop_bytes": whole["plan_bytes"] - chunked["plan_bytes"]})
    return drops


def format_results(results: list) -> str:
    width = max([3] + [len(r["run"]) for r in results])
    lines = [f"{'run':<{width}} {'rank':>4} {'measured MiB':>13} {'plan MiB':>9} {'ratio':>6}"]
    lines += [f"{r['run']:<{width}} {r['rank']:>4} {r['measured_bytes'] / MIB:>13.1f} {r['plan_bytes'] / MIB:>9.1f} "
              f"{r['ratio']:>6.2f}" for r in results]
    drops = logits_drops(results)
    if drops:
        lines += ["", f"{'chunked logits against the whole':<{width}} {'rank':>4} {'measured drop MiB':>18} "
                      f"{'planned drop MiB':>17}"]
        lines += [f"{d['run']:<{width}} {d['rank']:>4} {d['measured_drop_bytes'] / MIB:>18.1f} "
                  f"{d['plan_drop_bytes'] / MIB:>17.1f}" for d in drops]
    return "\n".join(lines)


def launch(spec_path: Path, out: Path, world_size: int) -> None:
    from pipeline.ports import free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **MALLOC_ENV)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size), "--master_port",
               str(free_port()), "--module", "benchmarks.memory_vs_plan", "--rank-run", str(spec_path), str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the ranks failed:\n{(result.stdout + result.stderr)[-4000:]}")


def benchmark_runs(root: Path, policy: Path, reward: Path, data: dict, steps: int) -> dict:
    def run(stage, **options):
        return stage, stage_values(stage, policy, reward, data, steps=steps, **options)

    policy_options = dict(max_length=160, max_prompt_length=96, new_tokens=64, micro_batch=4, checkpointing=True)
    sft_zero3 = dict(zero=3, optimizer="adamw", checkpointing=True, micro_batch=4)
    return {
        "sft ZeRO-2": run("sft", zero=2, optimizer="adam_mini"),
        "sft ZeRO-2" + WHOLE_LOGITS: run("sft", zero=2, optimizer="adam_mini", logits_chunk=0),
        "sft ZeRO-3": run("sft", **sft_zero3),
        "sft ZeRO-3" + WHOLE_LOGITS: run("sft", **sft_zero3, logits_chunk=0),
        # The ZeRO-2 run's tokens as one pack of two rows: one (1, 512) sequence, its mask block-diagonal.
        "sft ZeRO-2 packed": run("sft", zero=2, optimizer="adam_mini", micro_batch=1, packing_tokens=512),
        "reward ZeRO-2": run("reward", zero=2, optimizer="adamw", micro_batch=1),
        "remax ZeRO-2": run("remax", zero=2, optimizer="adam_mini", **policy_options),
        "ppo ZeRO-2": run("ppo", zero=2, optimizer="adam_mini", **policy_options),
        "ppo ZeRO-2" + WHOLE_LOGITS: run("ppo", zero=2, optimizer="adam_mini", logits_chunk=0, **policy_options),
        **({"remax ZeRO-2 vLLM": run("remax", zero=2, optimizer="adam_mini", rollout=VLLM_ROLLOUT, **policy_options)}
           if HAS_VLLM else {}),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per stage")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it")
    parser.add_argument("--only", default=None, help="comma-separated run names to run (e.g. 'sft ZeRO-2')")
    parser.add_argument("--rank-run", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_run:
        rank_main(*args.rank_run)
        return 0
    root = Path(args.keep or tempfile.mkdtemp(prefix="memory_vs_plan_"))
    root.mkdir(parents=True, exist_ok=True)
    policy, reward, numel = build_models(root, narrow_llama_config())
    runs = benchmark_runs(root, policy, reward, write_data(root), args.steps)
    if args.only:
        runs = {name: run for name, run in runs.items() if name in args.only.split(",")}
    spec = write_spec(root, runs, warmup_runs(root))
    print(f"model: {numel / 1e6:.1f}M parameters, bf16 safetensors in {root}")
    launch(spec, root / "measured", 2)
    results = compare(spec, root / "measured", 2)
    print(format_results(results))
    (root / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
