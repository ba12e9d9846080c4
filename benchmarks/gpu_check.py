"""The set-up and the report of benchmarks/gpu_check.sh (one GPU: SFT, reward and ReMax a few steps each).

    python -m benchmarks.gpu_check prepare ROOT [--size 1b|tiny] [--steps 8]
        writes ROOT/tokenizer (32000 words), ROOT/data/*.jsonl and ROOT/configs/{sft,reward,remax}.yaml
    python -m benchmarks.gpu_check report ROOT [--json PATH] [key.sub=value ...]
        per stage: tokens/s and step time (median over the steps after the first), peak memory, and the
        memory plan (`pipeline.plan`, the same config at 1 rank) with the measured / planned ratio

Nothing is downloaded. The model is a random Llama of TinyLlama's shape (1.1B parameters: hidden 2048,
22 layers, 32 heads, 4 KV heads, vocabulary 32000) in bf16; `--size tiny` shrinks it (and the sequences)
so the whole check can be rehearsed on a CPU. The data are random words of the tokenizer: the step costs
the same whatever the text says. Peak memory is the CUDA allocator's peak (`max_memory_allocated`) on a
GPU, the peak RSS on a CPU.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

VOCAB_SIZE = 32000
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
GIB = 2**30
SIZES = {
    # TinyLlama-1.1B's shape; sequences as the 7B configs' ReMax (prompt + response 512 tokens).
    "1b": dict(model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                          num_key_value_heads=4),
               prompt_words=200, response_words=300, max_length=512, max_prompt_length=256, max_new_tokens=256,
               micro_batch=8),
    # Heads of 32: the smallest head size vLLM's CPU attention takes (the rehearsal runs ReMax on vLLM too).
    "tiny": dict(model=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2),
                 prompt_words=12, response_words=16, max_length=48, max_prompt_length=20, max_new_tokens=8,
                 micro_batch=4),
}
# ReMax a second time with vLLM generating its rollouts, where vLLM is installed (bash scripts/setup.sh --vllm).
STAGES = ("sft", "reward", "remax") + (("remax_vllm",) if importlib.util.find_spec("vllm") else ())


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over w0 ... w31995 plus four special tokens: Llama's vocabulary size, so
    the logits and the embeddings are as large as the real model's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{index}" for index in range(VOCAB_SIZE - len(SPECIALS))]
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)


def write_data(directory: Path, size: dict, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(f"w{rng.randrange(VOCAB_SIZE - len(SPECIALS))}" for _ in range(words))

    directory.mkdir(parents=True, exist_ok=True)
    layouts = {"sft.jsonl": lambda: {"prompt": text(size["prompt_words"]), "response": text(size["response_words"])},
               "pairs.jsonl": lambda: {"prompt": text(size["prompt_words"]), "chosen": text(size["response_words"]),
                                       "rejected": text(size["response_words"])},
               "prompts.jsonl": lambda: {"prompt": text(size["prompt_words"])}}
    for name, row in layouts.items():
        with open(directory / name, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(row()) + "\n" for _ in range(rows))


def stage_configs(root: Path, size: dict, steps: int) -> dict:
    """{stage: config dict}: bf16 weights and engine, ZeRO-2, gradient checkpointing, Adam-mini, `steps`
    optimizer steps."""
    def common():  # a fresh copy per stage: shared sub-dicts would be written as YAML aliases
        return copy.deepcopy(shared)

    shared = dict(seed=0,
                  optim=dict(name="adam_mini", lr=1e-5, betas=[0.9, 0.95], scheduler="constant",
                             gradient_clipping=1.0),
                  engine=dict(zero_stage=2, precision="bf16", micro_batch_size=size["micro_batch"],
                              gradient_accumulation_steps=1),
                  training=dict(epochs=1, max_steps=steps),
                  logging=dict(progress_bar=False, tensorboard=False),
                  checkpoint=dict(overwrite=True))
    lengths = dict(max_length=size["max_length"], max_prompt_length=size["max_prompt_length"])
    sft_export = str(root / "sft" / "final")
    model = dict(model_type="llama", vocab_size=VOCAB_SIZE, max_position_embeddings=2048, tie_word_embeddings=False,
                 pad_token_id=0, bos_token_id=2, eos_token_id=3, **size["model"])
    configs = {
        "sft": dict(common(), output_dir=str(root / "sft"),
                    model=dict(config=model, tokenizer_path=str(root / "tokenizer"), dtype="bf16",
                               gradient_checkpointing=True),
                    data=dict(path=str(root / "data" / "sft.jsonl"), format="sft", **lengths)),
        "reward": dict(common(), output_dir=str(root / "reward"),
                       model=dict(path=sft_export, dtype="bf16", gradient_checkpointing=True),
                       data=dict(path=str(root / "data" / "pairs.jsonl"), format="pairwise", **lengths)),
        "remax": dict(common(), output_dir=str(root / "remax"),
                      model=dict(path=sft_export, dtype="bf16", gradient_checkpointing=True),
                      data=dict(path=str(root / "data" / "prompts.jsonl"), format="prompt", **lengths),
                      remax=dict(reward_model_path=str(root / "reward" / "final"), kl_coef=0.1,
                                 max_new_tokens=size["max_new_tokens"], temperature=1.0, top_p=1.0)),
    }
    configs["remax_vllm"] = copy.deepcopy(configs["remax"])
    configs["remax_vllm"].update(output_dir=str(root / "remax_vllm"), rollout=dict(engine="vllm"))
    return {stage: configs[stage] for stage in STAGES}


def prepare(root: Path, size_name: str, steps: int) -> None:
    size = SIZES[size_name]
    write_tokenizer(root / "tokenizer")
    # Enough rows for `steps` batches after the 5% held-out split.
    write_data(root / "data", size, rows=max(64, 2 * steps * size["micro_batch"]))
    (root / "configs").mkdir(parents=True, exist_ok=True)
    for stage, config in stage_configs(root, size, steps).items():
        (root / "configs" / f"{stage}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def read_rows(path: Path) -> list:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if "tokens_per_s" in row]


def planned_bytes(config_path: Path, overrides=()) -> int:
    """`pipeline.plan`'s per-rank total for this config's optimizer and ZeRO stage at 1 rank."""
    from pipeline.config import RunConfig, load_config

    config = load_config(RunConfig, str(config_path), list(overrides), other_sections=True)
    result = subprocess.run([sys.executable, "-m", "pipeline.plan", "--config", str(config_path), "--world-sizes",
                             "1", "--json", *overrides], capture_output=True, text=True, check=True)
    rows = json.loads(result.stdout)
    row = next(r for r in rows if r["optimizer"] == config.optim.name and r["zero_stage"] == config.engine.zero_stage)
    return int(row["total_bytes"])


def stage_figures(root: Path, stage: str, overrides=()) -> dict:
    rows = read_rows(root / stage / "metrics.jsonl")
    timed = rows[1:] or rows  # the first step carries one-off costs (allocation, kernel selection)
    peak = max(row["peak_memory_bytes"] for row in rows)
    plan = planned_bytes(root / "configs" / f"{stage}.yaml", overrides)
    return {"stage": stage, "steps": len(rows), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "step_time_s": statistics.median(r["step_time"] for r in timed), "peak_memory_bytes": peak,
            "plan_bytes": plan, "peak_over_plan": peak / plan}


def report(root: Path, json_path=None, overrides=()) -> list:
    figures = [stage_figures(root, stage, overrides) for stage in STAGES]
    header = f"{'stage':<8}{'steps':>6}{'tokens/s':>11}{'step s':>9}{'peak GiB':>10}{'plan GiB':>10}{'peak/plan':>11}"
    print(header)
    for f in figures:
        print(f"{f['stage']:<8}{f['steps']:>6}{f['tokens_per_s']:>11.0f}{f['step_time_s']:>9.2f}"
              f"{f['peak_memory_bytes'] / GIB:>10.2f}{f['plan_bytes'] / GIB:>10.2f}{f['peak_over_plan']:>11.2f}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare")
    prepare_parser.add_argument("root", type=Path)
    prepare_parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    prepare_parser.add_argument("--steps", type=int, default=8)
    report_parser = commands.add_parser("report")
    report_parser.add_argument("root", type=Path)
    report_parser.add_argument("--json", default=None)
    report_parser.add_argument("overrides", nargs="*", help="the key.sub=value settings the stages ran with")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.root, args.size, args.steps)
    else:
        report(args.root, args.json, args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
