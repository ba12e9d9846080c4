"""Per-step overhead against TRL, side by side in one process: same model, data, batch, optimizer, threads.

    python -m benchmarks.peer_trl [--steps 30] [--warmup 5] [--pairs sft,reward,grpo,rloo,dpo] [--hidden 512]
        [--layers 4] [--json PATH]

Pairs (ours vs TRL), each training as many sequences per optimizer step on both sides:
  sft     stages.sft    vs trl.SFTTrainer: 16 prompt-completion rows, loss on the completion
  reward  stages.reward vs trl.RewardTrainer: 16 pairs (32 sequences), Bradley-Terry on chosen/rejected
  grpo    stages.grpo   vs trl.GRPOTrainer: 16 prompts x 2 samples (32 sequences generated and trained), advantages
          normalised by the group's std, clipped surrogate (token mean), kl 0.05 x the k3 estimate in the loss
  rloo    stages.rloo   vs trl.RLOOTrainer: 16 prompts x 2 samples (32 sequences generated and trained),
          leave-one-out baseline, kl 0.05 x the log-ratio summed over the response in the reward
  dpo     stages.dpo    vs trl.DPOTrainer: 16 pairs (32 sequences, one forward), sigmoid loss, beta 0.1, the
          frozen reference's forward every step
The sampling pairs generate up to 12 new tokens (temperature 1, top-p 1, no top-k), train once on each
rollout (ours `updates_per_rollout: 1`, TRL `num_iterations=1`) and score with a scalar reward model made
from the policy (ours in stages.reward's format, TRL's a sequence classifier with the same weights).

Every run starts from the same saved Llama (`--layers` x `--hidden`, the demo tokenizer), the demo data,
AdamW (torch, fused), a constant LR, gradients clipped at norm 1, fp32 on both sides (TRL 1.x's configs
turn on bf16 autocast unless told otherwise: `bf16 = not fp16`), no activation checkpointing (TRL 1.x's
default is on), no evaluation and no checkpoints while timed (ours: `training.eval_at_start=false`, as
TRL's default), on the CPU threads given to this process. Ours runs in a world of one (DeepSpeed ZeRO-0)
inside this process; TRL runs its Trainer. Both are timed the same way: the wall-clock instant each
optimizer step ends (ours: its progress line; TRL: `on_step_end`), so a step's time is everything
between two step ends (data, generation and scoring where there is any, forward, backward, update,
metrics). The first `--warmup` steps are dropped and the median of the rest reported, and the fastest of
them (on a shared machine its ratio moves less). Time to first step runs from the call that builds the
trainer (ours: the stage entry) to the end of step 1.

What no setting makes the same (TRL 1.16's trainers do it regardless):
  - RLOOTrainer runs a gradient-free forward of the policy over every sample for the log-probs its KL
    penalty reads, even with one update per rollout; ours takes the update's own log-probs, detached.
  - GRPOTrainer and RLOOTrainer decode each completion and re-tokenise prompt + completion for the reward
    model, so it scores the last text token; ours scores the sampled ids, at the eos where there is one.
  - What is sampled: the same settings, but other random draws, and from step 2 on other weights. A step's
    cost grows with the completions' length, so the table shows each side's mean over the timed steps.
  - SFT, reward and DPO: ours holds out 2% of the rows for its evaluation (not run while timed); TRL
    trains on all of them. Neither side truncates: every demo row fits in 40 tokens.
The JSON result has per pair and side `per_step`, the batch of one optimizer step computed from that
side's resolved settings (rows, pairs or prompts; sequences trained and, for the sampling pairs,
generated), and the `precision` and `activation_checkpointing` it ran with.
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
BATCH = 16           # rows (SFT), pairs (reward, DPO) or prompts (GRPO, RLOO) per optimizer step
SAMPLES = 2          # completions per prompt (GRPO, RLOO): TRL's num_generations
LR = 1e-4
MAX_NEW_TOKENS = 12
KL_COEF = 0.05       # GRPO: x k3 in the loss; RLOO: x the summed log-ratio in the reward (each as TRL puts it)
DPO_BETA = 0.1
PAIRS = ("sft", "reward", "grpo", "rloo", "dpo")
SAMPLING = ("grpo", "rloo")
PAIRWISE = ("reward", "dpo")   # two sequences (chosen, rejected) per row


# ---- shared inputs ------------------------------------------------------------------------------

def build_inputs(root: Path, hidden: int, layers: int) -> dict:
    """The policy (a fresh Llama), a reward model from it (the same weights in our format and TRL's), and
    one batch of held-out prompts."""
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
    reward_ours = RewardModel.from_causal_lm(ModelConfig(path=str(root / "policy")))
    reward_ours.save_pretrained(root / "reward_ours")
    trl_reward = LlamaForSequenceClassification.from_pretrained(root / "policy", num_labels=1)
    with torch.no_grad():  # the same scoring function on both sides: what is sampled (and how long) follows it
        trl_reward.score.weight.copy_(reward_ours.v_head.weight)
    trl_reward.config.pad_token_id = tokenizer.pad_token_id
    trl_reward.save_pretrained(root / "reward_trl")
    tokenizer.save_pretrained(root / "reward_trl")
    # Our sampling stages evaluate after the last (timed) step: one batch of held-out prompts keeps that short.
    held_out = (REPO_ROOT / "data/demo/eval_prompts.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "eval_prompts.jsonl").write_text("".join(held_out[:BATCH]), encoding="utf-8")
    return {"root": root, "tokenizer": tokenizer}


def whole(count: float):
    """A per-step count as an int where it is one (a rollout reused over steps makes fractions)."""
    return int(count) if float(count).is_integer() else count


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


def our_stage(pair: str) -> tuple:
    """(the stage's `run`, its config class): each pair is named after our stage."""
    from pipeline.stages import STAGES

    return STAGES[pair].run, STAGES[pair].config_class


def our_config(pair: str, root: Path, steps: int) -> dict:
    """Our stage's config for `pair`, as the YAML a user would write."""
    config = {"output_dir": str(root / f"ours_{pair}"), "seed": 0, "model": {"path": str(root / "policy")},
              "optim": {"name": "adamw", "lr": LR, "betas": [0.9, 0.999], "scheduler": "constant",
                        "weight_decay": 0.0, "gradient_clipping": 1.0},
              "engine": {"zero_stage": 0, "micro_batch_size": BATCH, "precision": "fp32"},
              "training": {"max_steps": steps, "eval_every_steps": 10**6, "eval_at_start": False},
              "logging": {"progress_bar": False, "tensorboard": False},
              "checkpoint": {"overwrite": True}}
    data = {"max_length": 40, "max_prompt_length": 24}
    if pair == "sft":
        config["data"] = {**data, "path": str(REPO_ROOT / "data/demo/sft.jsonl"), "format": "sft", "eval_fraction": 0.02}
    elif pair in PAIRWISE:
        config["data"] = {**data, "path": str(REPO_ROOT / "data/demo/pairs.jsonl"), "format": "pairwise",
                          "eval_fraction": 0.02}
    else:
        config["data"] = {**data, "path": str(REPO_ROOT / "data/demo/prompts.jsonl"), "format": "prompt"}
    if pair == "dpo":
        config["dpo"] = {"beta": DPO_BETA, "loss_type": "sigmoid"}
    elif pair in SAMPLING:
        config[pair] = {"reward_model_path": str(root / "reward_ours"), "num_samples": SAMPLES, "kl_coef": KL_COEF,
                        "kl_penalty": "loss" if pair == "grpo" else "reward", "updates_per_rollout": 1,
                        "clip_range": 0.2, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "top_p": 1.0,
                        "eval_prompts_path": str(root / "eval_prompts.jsonl")}
        if pair == "grpo":
            config[pair]["scale_rewards"] = True  # TRL's scale_rewards="group"
    return config


def our_per_step(pair: str, config, world_size: int) -> dict:
    """One optimizer step's batch, from our resolved config (`pipeline.engine.batch_plan`)."""
    from pipeline.engine import batch_plan

    rows = batch_plan(config, world_size).global_batch_size  # rows, pairs or prompts
    if pair in SAMPLING:
        section = getattr(config, pair)
        return {"prompts": rows, "sequences_generated": whole(rows * section.num_samples / section.updates_per_rollout),
                "sequences_trained": rows * section.num_samples}
    return {"pairs" if pair in PAIRWISE else "rows": rows, "sequences_trained": rows * (2 if pair in PAIRWISE else 1)}


def run_ours(pair: str, inputs: dict, steps: int) -> dict:
    from pipeline.config import load_config
    from pipeline.run import main

    root = inputs["root"]
    stage, config_class = our_stage(pair)
    config_file = root / f"ours_{pair}.yaml"
    config_file.write_text(yaml.safe_dump(our_config(pair, root, steps)))
    resolved = load_config(config_class, str(config_file))  # as the stage will read it
    clock = StepClock()
    logging.getLogger("pipeline.loop").addHandler(clock)
    started = time.perf_counter()
    try:
        code = main(stage, config_class, ["--config", str(config_file)])
    finally:
        logging.getLogger("pipeline.loop").removeHandler(clock)
    if code != 0:
        raise SystemExit(f"our {pair} stage failed (exit {code})")
    records = read_jsonl(Path(resolved.output_dir) / "metrics.jsonl")
    return {"started": started, "step_ends": clock.step_ends, "engine_ready": clock.engine_ready,
            "completion_lengths": [r["response_length"] for r in records if "response_length" in r],
            "per_step": our_per_step(pair, resolved, int(os.environ.get("WORLD_SIZE", "1"))),
            "precision": resolved.engine.precision,
            "activation_checkpointing": resolved.model.gradient_checkpointing}


# ---- TRL ----------------------------------------------------------------------------------------

def trl_common(output_dir: Path, steps: int) -> dict:
    return dict(output_dir=str(output_dir), max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused", logging_steps=1,
                report_to="none", save_strategy="no", eval_strategy="no", use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True, per_device_train_batch_size=BATCH,
                gradient_accumulation_steps=1,
                # TRL's configs default to bf16 autocast (`bf16 = not fp16`) and to activation recomputation;
                # ours is fp32 with neither unless configured. `gradient_checkpointing` is TRL 1.x's own field
                # and the one name every transformers 5.x takes (5.19 has no `activation_checkpointing`; later
                # 5.x keep `gradient_checkpointing` as its alias until v6).
                bf16=False, fp16=False, gradient_checkpointing=False)


def trl_args(pair: str, root: Path, steps: int):
    """TRL's config for `pair`: `trl_common` plus the pair's own settings, matching `our_config`."""
    from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig

    common = trl_common(root / f"trl_{pair}", steps)
    if pair == "sft":
        return SFTConfig(**common, max_length=40, completion_only_loss=True)
    if pair == "reward":
        return RewardConfig(**common, max_length=40)
    if pair == "dpo":
        return DPOConfig(**common, max_length=40, beta=DPO_BETA, loss_type="sigmoid", precompute_ref_log_probs=False)
    # TRL's batch counts completions: BATCH prompts x SAMPLES; one generation per step, trained on once.
    sampling = dict(common, per_device_train_batch_size=BATCH * SAMPLES, num_generations=SAMPLES,
                    max_completion_length=MAX_NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=KL_COEF,
                    num_iterations=1, epsilon=0.2, log_completions=False)
    if pair == "grpo":
        # Ours: k3 in the loss as it is, token mean over the step's tokens (dapo with one micro-batch per step).
        return GRPOConfig(**sampling, scale_rewards="group", loss_type="dapo", use_bias_correction_kl=False)
    return RLOOConfig(**sampling, normalize_advantages=False)


def trl_per_step(pair: str, args) -> dict:
    """One optimizer step's batch, from TRL's resolved args."""
    rows = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if pair in SAMPLING:  # rows are completions; a generation batch serves steps_per_generation x num_iterations
        generated = args.generation_batch_size * args.gradient_accumulation_steps / (
            args.steps_per_generation * args.num_iterations)
        return {"prompts": whole(generated / args.num_generations), "sequences_generated": whole(generated),
                "sequences_trained": rows}
    return {"pairs" if pair in PAIRWISE else "rows": rows, "sequences_trained": rows * (2 if pair in PAIRWISE else 1)}


def trl_precision(args) -> str:
    """What TRL's Trainer will autocast to: Accelerate's mixed precision follows bf16 / fp16, else the
    ACCELERATE_MIXED_PRECISION environment variable."""
    return "fp32" if args.mixed_precision == "no" and not (args.bf16 or args.fp16) else str(args.mixed_precision)


def run_trl(pair: str, inputs: dict, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    root, tokenizer = inputs["root"], inputs["tokenizer"]

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.step_ends = []

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ends.append(time.perf_counter())

    from trl import DPOTrainer, GRPOTrainer, RewardTrainer, RLOOTrainer, SFTTrainer

    args = trl_args(pair, root, steps)
    if trl_precision(args) != "fp32":
        raise SystemExit(f"TRL would run under {trl_precision(args)} autocast (ACCELERATE_MIXED_PRECISION?); "
                         "ours is fp32")
    callback = StepEnds()
    started = time.perf_counter()
    if pair == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["response"]} for r in read_jsonl(REPO_ROOT / "data/demo/sft.jsonl")]
        trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(root / "policy"), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[callback])
    elif pair == "reward":
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in read_jsonl(REPO_ROOT / "data/demo/pairs.jsonl")]
        model = AutoModelForSequenceClassification.from_pretrained(root / "reward_trl", num_labels=1)
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, callbacks=[callback])
    elif pair == "dpo":
        rows = read_jsonl(REPO_ROOT / "data/demo/pairs.jsonl")  # prompt, chosen, rejected
        # The reference: a second copy of the starting weights, frozen (ours: the same).
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(root / "policy"), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[callback])
    else:
        rows = [{"prompt": r["prompt"]} for r in read_jsonl(REPO_ROOT / "data/demo/prompts.jsonl")]
        trainer_class = GRPOTrainer if pair == "grpo" else RLOOTrainer
        reward = AutoModelForSequenceClassification.from_pretrained(root / "reward_trl", num_labels=1)
        trainer = trainer_class(model=str(root / "policy"), reward_funcs=reward, args=args,
                                train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                reward_processing_classes=tokenizer, callbacks=[callback])
    trainer.train()
    history = trainer.state.log_history  # one record per step (logging_steps=1), then the run's summary
    return {"started": started, "step_ends": callback.step_ends, "per_step": trl_per_step(pair, trainer.args),
            "completion_lengths": [r["completions/mean_length"] for r in history if "completions/mean_length" in r],
            "precision": trl_precision(trainer.args),
            "activation_checkpointing": trainer.args.gradient_checkpointing}


# ---- the table ----------------------------------------------------------------------------------

def summarise(timed: dict, warmup: int) -> dict:
    ends = timed["step_ends"]
    intervals = [b - a for a, b in zip(ends, ends[1:])][max(warmup - 1, 0):]
    # The fastest step too: load from other processes only ever adds time, so on a shared machine its ratio
    # moves less than the median's.
    summary = {"step_ms": 1000 * statistics.median(intervals), "fastest_step_ms": 1000 * min(intervals),
               "first_step_s": ends[0] - timed["started"],
               "steps": len(ends), **{key: timed[key] for key in ("per_step", "precision", "activation_checkpointing")}}
    if timed["completion_lengths"]:  # sampling pairs: a step's cost grows with what was sampled
        summary["completion_length"] = statistics.mean(timed["completion_lengths"][warmup:])
    if timed.get("engine_ready") is not None:  # ours: data, model and DeepSpeed engine, then the first step
        summary["setup_s"] = timed["engine_ready"] - timed["started"]
    return summary


def format_table(results: dict) -> str:
    header = ("pair", "sequences/step", "completion tokens", "ours ms/step", "TRL ms/step", "step ratio",
              "fastest-step ratio", "ours first step s", "of which set-up s", "TRL first step s")
    lines = [header]
    for pair, result in results.items():
        ours, trl = result["ours"], result["trl"]
        trained = [side["per_step"]["sequences_trained"] for side in (ours, trl)]
        lengths = (f"{ours['completion_length']:.1f} / {trl['completion_length']:.1f}"
                   if "completion_length" in ours else "")
        lines.append((pair, f"{trained[0]}" if trained[0] == trained[1] else f"{trained[0]} vs {trained[1]}", lengths,
                      f"{ours['step_ms']:.1f}", f"{trl['step_ms']:.1f}", f"{ours['step_ms'] / trl['step_ms']:.2f}",
                      f"{ours['fastest_step_ms'] / trl['fastest_step_ms']:.2f}",
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
    print(f"{args.layers} layers x {args.hidden} wide Llama, fp32, {BATCH} rows, pairs or prompts ({SAMPLES} samples "
          f"each) per step, AdamW fused, {args.threads} threads, median of steps {args.warmup + 1}-{args.steps}")
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
