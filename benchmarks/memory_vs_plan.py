"""Measured per-rank memory against `pipeline.plan`'s peak, on 2 CPU ranks.

    python -m benchmarks.memory_vs_plan [--steps 3] [--keep DIR]

Builds a 32-layer narrow Llama (~81M parameters, vocab 32000, bf16 safetensors) and a reward model
from it in a temporary directory, then runs SFT at ZeRO-2 and ZeRO-3, reward training, ReMax
(reference and reward model at ZeRO-3) and PPO (the same, plus a critic trained from the reward
model) for a few steps each on 2 real DeepSpeed CPU ranks. Every
rank samples its own anonymous resident memory (RssAnon, /proc/self/status) every 5 ms from just
before the stage loads its models to the end of its steps; the bf16 weights stay memory-mapped from
the safetensors files, which plain RSS would count and RssAnon does not. The table gives per rank the
peak growth, the plan's peak for the same config, and their ratio.

What the CPU measurement validates: the bytes the plan counts (model states, frozen models, the
logits and loss buffers, the saved activations, DeepSpeed's buckets and live ZeRO-3 weights, the KV
cache) against what the ranks really allocate, with glibc returning freed blocks at once
(MALLOC_MMAP_THRESHOLD_). It does not validate the GPU's caching allocator (fragmentation and
reserved-but-free blocks come on top there; leave ~10% headroom) or flash-attention kernels; CPU
SDPA runs its own fused kernel, with no T x T matrix as on GPU. The final export is not measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
WORDS = ("the cat sat on a mat dog ran to park red blue green big small one two three four five yes no good bad "
         "what is how why where when who which tree house river stone cloud rain").split()


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

STAGE_MODULES = {"sft": "stages.sft", "reward": "stages.reward", "remax": "stages.remax", "ppo": "stages.ppo"}
CONFIG_CLASSES = {"sft": "SFTConfig", "reward": "RewardConfig", "remax": "RemaxConfig", "ppo": "PpoConfig"}


def rank_main(stage: str, config_path: str, out: str) -> None:
    import importlib

    from pipeline.rundir import RunDirectory

    module = importlib.import_module(STAGE_MODULES[stage])
    RunDirectory.export = lambda self, *args, **kwargs: None  # the final export is not part of the plan
    sampler = PeakSampler()
    sampler.start()
    code = module.main(module.run, getattr(module, CONFIG_CLASSES[stage]), argv=["--config", config_path])
    growth = sampler.stop()
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({"rank": rank, "growth_bytes": growth, "exit": code}))


# ---- the driver -------------------------------------------------------------------------------------

def narrow_llama_config():
    from transformers import LlamaConfig

    # 32 layers of width 384 (6 heads of 64), MLP 1024, vocab 32000: 81M parameters.
    return LlamaConfig(vocab_size=32000, hidden_size=384, intermediate_size=1024, num_hidden_layers=32,
                       num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=512,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def build_models(root: Path) -> tuple:
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.demo_task import train_tokenizer
    from pipeline.models import RewardModel

    policy, reward = root / "policy", root / "reward"
    torch.manual_seed(0)
    model = LlamaForCausalLM(narrow_llama_config()).to(torch.bfloat16)
    model.save_pretrained(policy)
    train_tokenizer([" ".join(WORDS)], policy)
    RewardModel(model.model).save_pretrained(reward)
    train_tokenizer([" ".join(WORDS)], reward)
    return policy, reward, sum(p.numel() for p in model.parameters())


def write_data(root: Path) -> dict:
    """Rows of one word per token that just fit `data.max_length` (256; prompts: `max_prompt_length` 96), so
    every batch is as long as the plan assumes (rows over the limit would be dropped, not cut)."""
    import random

    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    files = {"sft": [{"prompt": text(60), "response": text(190)} for _ in range(64)],
             "pairs": [{"prompt": text(60), "chosen": text(190), "rejected": text(190)} for _ in range(64)],
             "prompts": [{"prompt": text(92)} for _ in range(64)]}
    paths = {}
    for name, rows in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def run_configs(root: Path, policy: Path, reward: Path, data: dict, steps: int) -> dict:
    common = dict(seed=0, training={"max_steps": steps, "eval_at_start": False},
                  logging={"progress_bar": False, "tensorboard": False}, checkpoint={"every_steps": 10**6})
    model = lambda **extra: {"path": str(policy), **extra}  # noqa: E731
    sft_data = {"path": str(data["sft"]), "format": "sft", "max_length": 256, "max_prompt_length": 96,
                "eval_fraction": 0.1}
    runs = {
        "sft ZeRO-2": ("sft", dict(model=model(), data=sft_data, optim={"name": "adam_mini", "lr": 1e-5},
                                   engine={"zero_stage": 2, "precision": "bf16", "micro_batch_size": 2})),
        "sft ZeRO-3": ("sft", dict(model=model(gradient_checkpointing=True), data=sft_data,
                                   optim={"name": "adamw", "lr": 1e-5},
                                   engine={"zero_stage": 3, "precision": "bf16", "micro_batch_size": 4})),
        "reward ZeRO-2": ("reward", dict(model=model(), data={**sft_data, "path": str(data["pairs"]),
                                                              "format": "pairwise"},
                                         optim={"name": "adamw", "lr": 1e-5},
                                         engine={"zero_stage": 2, "precision": "bf16", "micro_batch_size": 1})),
        "remax ZeRO-2": ("remax", dict(model=model(gradient_checkpointing=True),
                                       data={"path": str(data["prompts"]), "format": "prompt", "max_length": 160,
                                             "max_prompt_length": 96, "eval_fraction": 0.1},
                                       optim={"name": "adam_mini", "lr": 1e-6},
                                       engine={"zero_stage": 2, "precision": "bf16", "micro_batch_size": 4},
                                       remax={"reward_model_path": str(reward), "max_new_tokens": 64,
                                              "ref_zero_stage": 3, "reward_zero_stage": 3})),
        # Actor and critic (from the reward model) both trained at ZeRO-2, two updates per rollout as shipped.
        "ppo ZeRO-2": ("ppo", dict(model=model(gradient_checkpointing=True),
                                   data={"path": str(data["prompts"]), "format": "prompt", "max_length": 160,
                                         "max_prompt_length": 96, "eval_fraction": 0.1},
                                   optim={"name": "adam_mini", "lr": 1e-6},
                                   engine={"zero_stage": 2, "precision": "bf16", "micro_batch_size": 4},
                                   ppo={"reward_model_path": str(reward), "max_new_tokens": 64, "num_samples": 1,
                                        "ref_zero_stage": 3, "reward_zero_stage": 3, "critic_init": "reward"})),
    }
    configs = {}
    for name, (stage, values) in runs.items():
        slug = name.replace(" ", "_").replace("-", "")
        path = root / f"{slug}.yaml"
        import yaml
        path.write_text(yaml.safe_dump({"output_dir": str(root / "runs" / slug), **common, **values}))
        configs[name] = (stage, path)
    return configs


def planned_peak(stage: str, config_path: Path, world_size: int) -> int:
    import importlib

    from pipeline.config import load_config
    from pipeline.plan import build_meta_critic, build_meta_model, frozen_numels, plan_rows, workload_of

    module = importlib.import_module(STAGE_MODULES[stage])
    config = load_config(getattr(module, CONFIG_CLASSES[stage]), str(config_path))
    model = build_meta_model(config, stage)
    rows = plan_rows(model, [world_size], config.engine.precision,
                     workload_of(config, stage, frozen_numels(config, stage)), build_meta_critic(config))
    return next(row["total_bytes"] for row in rows
                if (row["optimizer"], row["zero_stage"]) == (config.optim.name, config.engine.zero_stage))


def launch(stage: str, config_path: Path, out: Path, world_size: int) -> list:
    from pipeline.ports import free_port

    port = free_port()
    # glibc hands every block of 64 KiB or more back to the kernel when freed, so RssAnon follows live
    # tensors instead of keeping the heap's high-water mark.
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world_size), "--master_port",
               str(port), "--module", "benchmarks.memory_vs_plan", "--rank-run", stage, str(config_path), str(out)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    ranks = [json.loads(Path(f"{out}.rank{rank}.json").read_text()) for rank in range(world_size)
             if Path(f"{out}.rank{rank}.json").is_file()]
    if result.returncode != 0 or len(ranks) < world_size or any(rank["exit"] for rank in ranks):
        raise SystemExit(f"{stage} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return ranks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per stage")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it")
    parser.add_argument("--only", default=None, help="comma-separated run names to run (e.g. 'sft ZeRO-2')")
    parser.add_argument("--rank-run", nargs=3, metavar=("STAGE", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_run:
        rank_main(*args.rank_run)
        return 0
    root = Path(args.keep or tempfile.mkdtemp(prefix="memory_vs_plan_"))
    root.mkdir(parents=True, exist_ok=True)
    policy, reward, numel = build_models(root)
    configs = run_configs(root, policy, reward, write_data(root), args.steps)
    wanted = set(args.only.split(",")) if args.only else set(configs)
    print(f"model: {numel / 1e6:.1f}M parameters, bf16 safetensors in {root}")
    print(f"{'run':<15} {'rank':>4} {'measured MiB':>13} {'plan MiB':>9} {'ratio':>6}")
    results = []
    for name, (stage, path) in configs.items():
        if name not in wanted:
            continue
        plan = planned_peak(stage, path, 2)
        for rank in launch(stage, path, root / name.replace(" ", "_"), 2):
            ratio = rank["growth_bytes"] / plan
            results.append({"run": name, "rank": rank["rank"], "measured_bytes": rank["growth_bytes"],
                            "plan_bytes": plan, "ratio": ratio})
            print(f"{name:<15} {rank['rank']:>4} {rank['growth_bytes'] / MIB:>13.0f} {plan / MIB:>9.0f} {ratio:>6.2f}",
                  flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
