"""Times `optimizer.step()` of our Adam-mini against AdamW and the official Adam-mini.

A ~30M-parameter Llama in fp32 on the CPU, with fixed gradients: only the step is timed,
so the numbers compare optimizers, not forward or backward passes.

    python -m benchmarks.optimizer_step [--steps 30] [--warmup 3] [--threads N] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import adam_mini
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimizers import Adam_mini

HYPERPARAMETERS = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# The vocabulary is cut from Llama's 32000 so that an untied embedding and head (both of
# which Adam-mini partitions by row) still leave the transformer blocks a fair share of 30M.
MODEL_CONFIG = dict(vocab_size=18000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
FUSED_ADAMW = "AdamW (fused)"
OFFICIAL = "adam_mini 1.1.1 (official)"


def build_model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG)).to(torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)
    return model


def copy_with_grads(model: torch.nn.Module) -> torch.nn.Module:
    # deepcopy does not carry .grad over to the copied parameters.
    clone = copy.deepcopy(model)
    for source, target in zip(model.parameters(), clone.parameters()):
        target.grad = source.grad.clone()
    return clone


def make_optimizers(model: torch.nn.Module) -> dict:
    geometry = dict(dim=MODEL_CONFIG["hidden_size"], n_heads=MODEL_CONFIG["num_attention_heads"],
                    n_kv_heads=MODEL_CONFIG["num_key_value_heads"])
    factories = {
        "Adam_mini (fused)": lambda m: Adam_mini(m.named_parameters(), **HYPERPARAMETERS, **geometry,
                                                 implementation="fused"),
        "Adam_mini (compiled)": lambda m: Adam_mini(m.named_parameters(), **HYPERPARAMETERS, **geometry,
                                                    implementation="compiled"),
        "Adam_mini (foreach)": lambda m: Adam_mini(m.named_parameters(), **HYPERPARAMETERS, **geometry,
                                                   implementation="foreach"),
        "Adam_mini (reference)": lambda m: Adam_mini(m.named_parameters(), **HYPERPARAMETERS, **geometry,
                                                     implementation="reference"),
        "AdamW (foreach)": lambda m: torch.optim.AdamW(m.parameters(), **HYPERPARAMETERS, foreach=True),
        FUSED_ADAMW: lambda m: torch.optim.AdamW(m.parameters(), **HYPERPARAMETERS, fused=True),
        OFFICIAL: lambda m: adam_mini.Adam_mini(m.named_parameters(), **HYPERPARAMETERS, **geometry,
                                                verbose=False),
    }
    # Each optimizer steps its own copy, so none sees parameters another has already moved.
    return {name: factory(copy_with_grads(model)) for name, factory in factories.items()}


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    if isinstance(optimizer, Adam_mini):
        return optimizer.state_bytes()
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if isinstance(value, torch.Tensor))


def time_steps(optimizers: dict, warmup: int, steps: int) -> dict:
    """Seconds per step for each optimizer, taken round-robin so noise hits all alike."""
    for optimizer in optimizers.values():
        for _ in range(warmup):  # allocates the lazy state, builds the fused kernel, compiles
            optimizer.step()
    timings = {name: [] for name in optimizers}
    gc.collect()
    gc.disable()  # a collection landing inside one step would be charged to that optimizer
    try:
        for _ in range(steps):
            for name, optimizer in optimizers.items():
                start = time.perf_counter()
                optimizer.step()
                timings[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return timings


def summarise(optimizers: dict, timings: dict) -> list[dict]:
    quartiles = {name: statistics.quantiles(seconds, n=4, method="inclusive") for name, seconds in timings.items()}
    fused_adamw_ms = quartiles[FUSED_ADAMW][1] * 1e3
    official_ms = quartiles[OFFICIAL][1] * 1e3
    adamw_bytes = state_bytes(optimizers[FUSED_ADAMW])
    rows = []
    for name, (q1, median, q3) in quartiles.items():
        median_ms, state = median * 1e3, state_bytes(optimizers[name])
        rows.append({"optimizer": name, "median_ms": median_ms, "iqr_ms": (q3 - q1) * 1e3,
                     "vs_fused_adamw": median_ms / fused_adamw_ms, "vs_official": median_ms / official_ms,
                     "state_mb": state / 2**20, "state_vs_adamw": state / adamw_bytes})
    return rows


def print_table(rows: list[dict]) -> None:
    header = ("optimizer", "median ms", "IQR ms", "x AdamW fused", "x official", "state MB", "state/AdamW")
    lines = [(row["optimizer"], f"{row['median_ms']:.2f}", f"{row['iqr_ms']:.2f}", f"{row['vs_fused_adamw']:.2f}",
              f"{row['vs_official']:.2f}", f"{row['state_mb']:.1f}", f"{row['state_vs_adamw']:.3f}")
             for row in rows]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]
    for line in [header] + lines:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(line, widths))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 to give quartiles")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model = build_model(args.seed)
    parameter_count = sum(param.numel() for param in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"Llama with {parameter_count:,} parameters (fp32, CPU), "
          f"{args.warmup} warm-up + {args.steps} timed steps each")

    optimizers = make_optimizers(model)
    del model
    rows = summarise(optimizers, time_steps(optimizers, args.warmup, args.steps))
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "parameters": parameter_count, "steps": args.steps, "warmup": args.warmup,
                       "hyperparameters": HYPERPARAMETERS, "model": MODEL_CONFIG, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
