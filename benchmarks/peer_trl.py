"""Per-step overhead against TRL, side by side in one process: same model, data, batch, optimizer, threads.

    python -m benchmarks.peer_trl [--steps 30] [--warmup 5] [--pairs sft,reward,remax] [--hidden 512]
        [--layers 4] [--json PATH]

Pairs (ours vs TRL):
  sft     stages.sft               vs trl.SFTTrainer (prompt-completion data, loss on the completion)
  reward  stages.reward            vs trl.RewardTrainer (Bradley-Terry on chosen/rejected)
  remax   stages.remax (1 sample + 1 greedy response per prompt, KL to a reference)
          vs trl.GRPOTrainer (2 sampled completions per prompt, beta > 0 so it keeps a reference too)

Every run starts from the same saved Llama (fp32, `--layers` x `--hidden`, the demo tokenizer),
the demo data, 16 rows per optimizer step, AdamW (torch, fused), a constant LR, no activation
checkpointing (TRL 1.x turns it on by default), no evaluation, no
checkpoints (ours: `training.eval_at_start=false`, as TRL's default), on the CPU threads given to this
process. Ours runs in a world of one (DeepSpeed
ZeRO-0) inside this process; TRL runs its Trainer. Both are timed the same way: the wall-clock
instant each optimizer step ends (ours: its progress line; TRL: `on_step_end`), so a step's time
is everything between two step ends (data, forward, backward, update, metrics). The first
`--warmup` steps are dropped and the median of the rest reported. Time to first step runs from
the call that builds the trainer (ours: the stage entry) to the end of step 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = REPO_ROOT / "data/demo/tokenizer"
BATCH = 16           # rows (SFT), pairs (reward) or prompts (ReMax / GRPO) per optimizer step
LR = 1e-4
MAX_NEW_TOKENS = 12
PAIRS = ("sft", "reward", "remax")


# ---- shared inputs ------------------------------------------------------------------------------

def build_inputs(root: Path, hidden: int, layers: int) -> dict:
    """The policy (a fresh Llama), a reward model from it in both our format and TRL's, and data."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.config import ModelConfig
    from pipeline.models import RewardModel

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32 * round(hidden * 8 / 3 / 32),
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    torch.manual_seed(1)
    RewardModel.from_causal_lm(ModelConfig(path=str(root / "policy"))).save_pretrained(root / "reward_ours")
    torch.manual_seed(1)
    trl_reward = LlamaForSequenceClassification.from_pretrained(root / "policy", num_labels=1)
    trl_reward.config.pad_token_id = tokenizer.pad_token_id
    trl_reward.save_pretrained(root / "reward_trl")
    tokenizer.save_pretrained(root / "reward_trl")
    return {"root": root, "tokenizer": tokenizer}


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- ours ---------------------------------------------------------------------------------------

class StepClock(logging.Handler):
    """Timestamps the loop's progress line, which it logs once per optimizer step ("step N/M ...")."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.step_ends, self.engine_ready = [], None

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("step "):
            self.step_ends.append(time.perf_counter())
        elif message.startswith("training ") and self.engine_ready is None:  # logged once the engine is built
            self.engine_ready = time.perf_counter()


def run_ours(pair: str, inputs: dict, steps: int) -> dict:
    from pipeline.run import main

    root = inputs["root"]
    config = {"output_dir": str(root / f"ours_{pair}"), "seed": 0, "model": {"path": str(root / "policy")},
              "optim": {"name": "adamw", "lr": LR, "betas": [0.9, 0.999], "scheduler": "constant",
                        "weight_decay": 0.0, "gradient_clipping": 1.0},
              "engine": {"zero_stage": 0, "micro_batch_size": BATCH},
              "training": {"max_steps": steps, "eval_every_steps": 10**6, "eval_at_start": False},
              "logging": {"progress_bar": False, "tensorboard": False},
              "checkpoint": {"overwrite": True}}
    if pair == "sft":
        from stages.sft import SFTConfig as config_class, run as stage
        config["data"] = {"path": str(REPO_ROOT / "data/demo/sft.jsonl"), "format": "sft", "max_length": 40,
                          "max_prompt_length": 24, "eval_fraction": 0.02}
    elif pair == "reward":
        from stages.reward import RewardConfig as config_class, run as stage
        config["data"] = {"path": str(REPO_ROOT / "data/demo/pairs.jsonl"), "format": "pairwise", "max_length": 40,
                          "max_prompt_length": 24, "eval_fraction": 0.02}
    else:
        from stages.remax import RemaxConfig as config_class, run as stage
        config["data"] = {"path": str(REPO_ROOT / "data/demo/prompts.jsonl"), "format": "prompt", "max_length": 40,
                          "max_prompt_length": 24}
        config["remax"] = {"reward_model_path": str(root / "reward_ours"), "max_new_tokens": MAX_NEW_TOKENS,
                           "eval_prompts_path": str(REPO_ROOT / "data/demo/eval_prompts.jsonl"), "kl_ctl": 0.05}
    config_file = root / f"ours_{pair}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    clock = StepClock()
    logging.getLogger("pipeline.loop").addHandler(clock)
    started = time.perf_counter()
    try:
        code = main(stage, config_class, ["--config", str(config_file)])
    finally:
        logging.getLogger("pipeline.loop").removeHandler(clock)
    if code != 0:
        raise SystemExit(f"our {pair} stage failed (exit {code})")
    return {"started": started, "step_ends": clock.step_ends, "engine_ready": clock.engine_ready}


# ---- TRL ----------------------------------------------------------------------------------------

def trl_common(output_dir: Path, steps: int) -> dict:
    return dict(output_dir=str(output_dir), max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", logging_steps=1,
                report_to="none", save_strategy="no", eval_strategy="no", use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True,
                # TRL's configs turn activation recomputation on by default; ours is off unless configured.
                activation_checkpointing=False)


def run_trl(pair: str, inputs: dict, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    root, tokenizer = inputs["root"], inputs["tokenizer"]

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.step_ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    from trl import GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    callback = StepEnds()
    started = time.perf_counter()
    if pair == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["response"]} for r in read_jsonl(REPO_ROOT / "data/demo/sft.jsonl")]
        args = SFTConfig(**trl_common(root / "trl_sft", steps), per_device_train_batch_size=BATCH, max_length=40,
                         completion_only_loss=True)
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(root / "policy"), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[callback])
    elif pair == "reward":
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in read_jsonl(REPO_ROOT / "data/demo/pairs.jsonl")]
        args = RewardConfig(**trl_common(root / "trl_reward", steps), per_device_train_batch_size=BATCH, max_length=40)
        model = AutoModelForSequenceClassification.from_pretrained(root / "reward_trl", num_labels=1)
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, callbacks=[callback])
    else:
        rows = [{"prompt": r["prompt"]} for r in read_jsonl(REPO_ROOT / "data/demo/prompts.jsonl")]
        args = GRPOConfig(**trl_common(root / "trl_grpo", steps), per_device_train_batch_size=2 * BATCH,
                          num_generations=2, max_completion_length=MAX_NEW_TOKENS, beta=0.05, temperature=1.0,
                          top_p=1.0, log_completions=False)
        reward = AutoModelForSequenceClassification.from_pretrained(root / "reward_trl", num_labels=1)
        trainer = GRPOTrainer(model=str(root / "policy"), reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              reward_processing_classes=tokenizer, callbacks=[callback])
    trainer.train()
    return {"started": started, "step_ends": callback.step_ends}


# ---- the table ----------------------------------------------------------------------------------

def summarise(timed: dict, warmup: int) -> dict:
    ends = timed["step_ends"]
    intervals = [b - a for a, b in zip(ends, ends[1:])][max(warmup - 1, 0):]
    summary = {"step_ms": 1000 * statistics.median(intervals), "first_step_s": ends[0] - timed["started"],
               "steps": len(ends)}
    if timed.get("engine_ready") is not None:  # ours: data, model and DeepSpeed engine, then the first step
        summary["setup_s"] = timed["engine_ready"] - timed["started"]
    return summary


def format_table(results: dict) -> str:
    header = ("pair", "ours ms/step", "TRL ms/step", "step ratio", "ours first step s", "of which set-up s",
              "TRL first step s")
    lines = [header]
    for pair, result in results.items():
        ours, trl = result["ours"], result["trl"]
        lines.append((pair, f"{ours['step_ms']:.1f}", f"{trl['step_ms']:.1f}", f"{ours['step_ms'] / trl['step_ms']:.2f}",
                      f"{ours['first_step_s']:.1f}", f"{ours.get('setup_s', float('nan')):.1f}",
                      f"{trl['first_step_s']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--pairs", default=",".join(PAIRS))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    pairs = [pair for pair in args.pairs.split(",") if pair]
    unknown = sorted(set(pairs) - set(PAIRS))
    if unknown or args.steps <= args.warmup + 1:
        parser.error(f"--pairs takes {', '.join(PAIRS)}; --steps must exceed --warmup + 1")
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        inputs = build_inputs(Path(directory), args.hidden, args.layers)
        for pair in pairs:
            # TRL first, then ours: the order alternates nothing, but each pair shares the same warm process.
            trl = summarise(run_trl(pair, inputs, args.steps), args.warmup)
            ours = summarise(run_ours(pair, inputs, args.steps), args.warmup)
            results[pair] = {"ours": ours, "trl": trl}
            print(f"{pair}: ours {ours['step_ms']:.1f} ms, TRL {trl['step_ms']:.1f} ms", file=sys.stderr, flush=True)
    print(f"{args.layers} layers x {args.hidden} wide Llama, fp32, {BATCH} rows per step, AdamW fused, "
          f"{args.threads} threads, median of steps {args.warmup + 1}-{args.steps}")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
