"""Per-rank memory plans: parameters, gradients and optimizer state for ZeRO 0-3, Adam-mini next to AdamW.

    python -m pipeline.plan --config FILE [--world-sizes 1,2,8] [--gpu-memory 80] [--json] [key.sub=value ...]

The model is built on the meta device from its config.json (no weights are read). The byte
layout is DeepSpeed's (its `estimate_zero{2,3}_model_states_mem_needs`): with bf16/fp16,
16-bit weights and gradients plus fp32 gradients and an fp32 master copy; ZeRO-1 shards the
optimizer side, ZeRO-2 the gradients too, ZeRO-3 the weights too (plus the largest layer,
gathered; its 16-bit gradients only pass through buckets). The optimizer's own state comes from the optimizer's accounting: Adam-mini's
`planned_state_bytes` (m for the slice, v for the blocks it touches), AdamW's two fp32
values per element of the slice.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, RunConfig, load_config
from .models import ModelLoadError, apply_lora, count_parameters, load_causal_lm
from .optim import OPTIMIZERS, planned_state_bytes

GIB = 2**30


def build_meta_model(config: RunConfig):
    """The run's model (LoRA applied) on the meta device: only config.json is read."""
    model = load_causal_lm(config.model, device="meta")
    if config.model.lora.enabled:
        model = apply_lora(model, config.model.lora)
    return model


def largest_layer_numel(model) -> int:
    return max(module_numel for module_numel in
               (sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()))


def plan_rows(model, world_sizes, precision: str = "bf16") -> list:
    """One row per (optimizer, zero stage, world size): bytes on the most loaded rank."""
    total, trainable = count_parameters(model)
    frozen = total - trainable
    states = planned_state_bytes(model, world_sizes)
    mixed = precision in ("bf16", "fp16")
    weight_bytes = 2 if mixed else 4
    largest = largest_layer_numel(model)
    rows = []
    for world_size in world_sizes:
        for stage in (0, 1, 2, 3):
            shard = lambda numel, sharded: numel / world_size if sharded else numel  # noqa: E731
            params = weight_bytes * shard(total, stage == 3)
            if stage == 3:
                params += 4 * largest  # one layer gathered in full (DeepSpeed's estimate)
            # ZeRO-3 reduces 16-bit gradients through transient buckets straight into its fp32 partition.
            grads = 0 if (mixed and stage == 3) else weight_bytes * shard(trainable, stage >= 2)
            if mixed:
                grads += 4 * shard(trainable, stage >= 1)  # fp32 gradients for the optimizer
            master = 4 * shard(trainable, stage >= 1) if mixed else 0
            for optimizer in OPTIMIZERS:
                optimizer_bytes = master + states[optimizer, world_size, stage]
                rows.append({"optimizer": optimizer, "zero_stage": stage, "world_size": world_size,
                             "params_bytes": int(params), "grads_bytes": int(grads),
                             "optimizer_bytes": int(optimizer_bytes),
                             "total_bytes": int(params + grads + optimizer_bytes),
                             "parameters": total, "trainable_parameters": trainable, "frozen_parameters": frozen})
    return rows


def dry_run_plan(config: RunConfig, world_size: int) -> str:
    """A stage's `--dry-run`: this run's per-rank weights and optimizer state, every optimizer of the
    table side by side with the chosen one marked."""
    model = build_meta_model(config)
    total, trainable = count_parameters(model)
    stage = config.engine.zero_stage
    states = planned_state_bytes(model, [world_size], [stage])
    bytes_per_param = 2 if config.engine.precision in ("bf16", "fp16") else 4
    shard = world_size if stage == 3 else 1
    lines = [f"dry run: {config.model.path or 'model.config'} on the meta device, ZeRO-{stage}, "
             f"{world_size} rank(s), {config.engine.precision}",
             f"  parameters            {total:>16,}",
             f"  trainable parameters  {trainable:>16,}",
             f"  weights per rank      {total * bytes_per_param / shard / GIB:>12.2f} GiB",
             "  optimizer state per rank (fp32):"]
    for name in OPTIMIZERS:
        chosen = "  <- chosen" if name == config.optim.name else ""
        lines.append(f"    {name:<20}{states[name, world_size, stage] / GIB:>12.2f} GiB{chosen}")
    if {"adam_mini", "adamw"} <= set(OPTIMIZERS):
        ratio = states["adam_mini", world_size, stage] / states["adamw", world_size, stage]
        lines.append(f"    adam_mini / adamw   {ratio:>12.3f}")
    return "\n".join(lines)


def format_table(rows: list, gpu_memory_gib=None) -> str:
    header = ["optimizer", "ZeRO", "ranks", "params GiB", "grads GiB", "optim GiB", "total GiB"]
    if gpu_memory_gib:
        header.append(f"fits {gpu_memory_gib:g} GiB")
    lines = [header]
    for row in rows:
        line = [row["optimizer"], str(row["zero_stage"]), str(row["world_size"])] + \
               [f"{row[k] / GIB:.2f}" for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "total_bytes")]
        if gpu_memory_gib:
            line.append("yes" if row["total_bytes"] <= gpu_memory_gib * GIB else "no")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-sizes", default="1,2,8", help="comma-separated rank counts")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU, to say what fits")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        world_sizes = [int(size) for size in args.world_sizes.split(",")]
        if any(size <= 0 for size in world_sizes):
            raise ValueError
    except ValueError:
        parser.error(f"--world-sizes is {args.world_sizes!r}; give positive integers such as 1,2,8")
    try:
        config = load_config(RunConfig, args.config, args.overrides, other_sections=True)
        model = build_meta_model(config)
    except (ConfigError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = plan_rows(model, world_sizes, config.engine.precision)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows, args.gpu_memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
