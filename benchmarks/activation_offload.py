"""What `model.offload_activations` costs in time: SFT with gradient checkpointing, without and with the
checkpointed layer inputs offloaded, side by side on 2 CPU ranks, as a ratio.

On CPU ranks "host" and "device" are one memory: the offload is a memory-to-memory copy of each layer's
input in the forward (and the copy handed back in the backward), so this measures the mechanism's own
overhead (the saved-tensor hooks and the copies), not a PCIe transfer; on a GPU the copies cross PCIe
(pipeline.fit's cost model prices them at its `HOST_LINK_BYTES_PER_S`). Launches alternate, each pair in
the other order, so machine noise hits both alike; the first `--warmup` steps of each are dropped. On a
shared machine whole launches drift by more than the difference, so `--pairs` also times the same model's
forward and backward in one process, with and without offload in turns, and gives the median of the
pairs' ratios.

    python -m benchmarks.activation_offload [--steps 8] [--warmup 2] [--repeats 3] [--pairs 20]
        [--hidden 1024] [--layers 4] [--tokens 8x40] [--keep DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.stage_throughput import (LAUNCH_TIMEOUT_S, MIB, WORLD_SIZE, launch, load_demo_tokenizer,
                                         model_config, parameter_count, read_steps, with_vocabulary,
                                         write_stage_config)

VARIANTS = {"checkpointing": ["model.gradient_checkpointing=true"],
            "checkpointing + offload": ["model.gradient_checkpointing=true", "model.offload_activations=true"]}


def run(name: str, repeat: int, config_path: Path, root: Path, args) -> dict:
    """One launch: its timed steps' times and tokens/s and rank 0's peak RSS, or `failed` with the reason."""
    run_dir = root / f"{name.replace(' + ', '-')}-r{repeat}"
    overrides = [*VARIANTS[name], "engine.zero_stage=2", "optim.name=adam_mini", f"output_dir={run_dir}",
                 "checkpoint.overwrite=true"]
    failure = launch("sft", config_path, overrides, root / f"{run_dir.name}.log", LAUNCH_TIMEOUT_S)
    steps = read_steps(run_dir)
    timed = [row for row in steps if row["step"] > args.warmup]
    if failure is not None or not timed:
        return {"variant": name, "failed": failure or f"no timed steps in {run_dir / 'metrics.jsonl'}"}
    return {"variant": name, "step_times": [row["step_time"] for row in timed],
            "tokens_per_s": [row["tokens_per_s"] for row in timed],
            "peak_memory_bytes": max(row["peak_memory_bytes"] for row in steps)}


def summarise(runs: list) -> dict:
    """Medians over every timed step of a variant's runs, and the median of their peaks."""
    done = [run for run in runs if "failed" not in run]
    if not done:
        return {"failed": "; ".join(run["failed"] for run in runs)}
    return {"runs": len(done), "step_ms": 1e3 * statistics.median(t for run in done for t in run["step_times"]),
            "tokens_per_s": statistics.median(v for run in done for v in run["tokens_per_s"]),
            "peak_rss_mib": statistics.median(run["peak_memory_bytes"] for run in done) / MIB}


def interleaved(args) -> dict:
    """One process, one thread: a checkpointed Llama's forward and backward on a `--tokens` batch, the same
    weights with and without offload in turns (which goes first alternates), `--pairs` times after a
    warm-up pair; the median of each variant's times and of the pairs' ratios."""
    import copy

    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import enable_gradient_checkpointing, load_causal_lm

    torch.set_num_threads(1)
    rows, length = (int(part) for part in args.tokens.split("x"))
    torch.manual_seed(0)
    config = with_vocabulary(model_config(args.hidden, args.layers), load_demo_tokenizer())
    plain = load_causal_lm(ModelConfig(config=config))
    offloaded = copy.deepcopy(plain)
    enable_gradient_checkpointing(plain)
    enable_gradient_checkpointing(offloaded, offload=True)
    input_ids = torch.randint(0, config["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(1))

    def seconds(model) -> float:
        started = time.perf_counter()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        elapsed = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        return elapsed

    times = {"checkpointing": [], "checkpointing + offload": []}
    for pair in range(args.pairs + 1):
        order = [("checkpointing", plain), ("checkpointing + offload", offloaded)]
        measured = {name: seconds(model) for name, model in (order if pair % 2 else order[::-1])}
        if pair:  # the first pair warms both up
            for name, elapsed in measured.items():
                times[name].append(elapsed)
    ratios = [with_offload / alone for alone, with_offload in zip(times["checkpointing"],
                                                                  times["checkpointing + offload"])]
    return {"tokens": args.tokens, "pairs": args.pairs,
            **{f"{name} ms": 1e3 * statistics.median(values) for name, values in times.items()},
            "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}


def launches(args) -> dict:
    """`--repeats` SFT launches per variant on 2 CPU ranks, alternating which goes first: each variant's
    medians, and the median over repeats of the offloaded run's median step time over its partner's."""
    runs = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="activation_offload-") as temp:
        root = Path(args.keep).resolve() if args.keep else Path(temp)
        root.mkdir(parents=True, exist_ok=True)
        config_path = write_stage_config("sft", root / "sft.yaml", model_config(args.hidden, args.layers),
                                         args.steps, None)
        for repeat in range(args.repeats):
            for name in (list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]):
                runs[name].append(run(name, repeat, config_path, root, args))
                print(f"  {name} run {repeat}: {'failed' if 'failed' in runs[name][-1] else 'done'}", flush=True)
    summary = {name: summarise(variant_runs) for name, variant_runs in runs.items()}
    pairs = [statistics.median(offloaded["step_times"]) / statistics.median(alone["step_times"])
             for alone, offloaded in zip(runs["checkpointing"], runs["checkpointing + offload"])
             if "failed" not in alone and "failed" not in offloaded]
    if pairs:
        summary["step_ratio"], summary["step_ratios"] = statistics.median(pairs), pairs
    return {"summary": summary, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="launches per variant (0: none)")
    parser.add_argument("--pairs", type=int, default=20, help="in-process pairs (0: none)")
    parser.add_argument("--tokens", default="8x40", help="the in-process batch: rows x tokens (the demo SFT rows: <= 40)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--keep", metavar="DIR", help="keep configs, run dirs and logs here")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.steps <= args.warmup or args.repeats < 0 or args.pairs < 0 or \
            not re.fullmatch(r"[1-9]\d*x[1-9]\d*", args.tokens):
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}, --repeats and --pairs must not be "
                     f"negative, and --tokens ({args.tokens!r}) reads ROWSxTOKENS, e.g. 8x40")
    started = time.perf_counter()
    parameters = parameter_count(model_config(args.hidden, args.layers), load_demo_tokenizer())
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {parameters:,} parameters (fp32) over the demo "
          f"tokenizer; SFT at ZeRO-2 with Adam-mini on {WORLD_SIZE} CPU ranks x 1 thread, {args.steps} steps per "
          f"launch (first {args.warmup} dropped), {args.repeats} launch(es) per variant", flush=True)
    results = {"args": vars(args), "parameters": parameters}
    if args.repeats:
        results["launches"] = launches(args)
        summary = results["launches"]["summary"]
        print(f"\n{'variant':<26}{'step ms':>10}{'tokens/s':>10}{'peak RSS MiB':>14}")
        for name in VARIANTS:
            row = summary[name]
            print(f"{name:<26}" + ("failed: " + row["failed"] if "failed" in row else
                                   f"{row['step_ms']:>10.1f}{row['tokens_per_s']:>10.0f}{row['peak_rss_mib']:>14.1f}"))
        if "step_ratio" in summary:
            print(f"offload / checkpointing alone, step time: x{summary['step_ratio']:.3f} (median over launch pairs: "
                  + ", ".join(f"{ratio:.3f}" for ratio in summary["step_ratios"]) + "; CPU: memory-to-memory copies)")
    if args.pairs:
        results["in_process"] = pairs = interleaved(args)
        print(f"in one process, {pairs['pairs']} pairs of forward + backward on {args.tokens} tokens: "
              f"checkpointing {pairs['checkpointing ms']:.1f} ms, with offload {pairs['checkpointing + offload ms']:.1f} "
              f"ms; median ratio x{pairs['ratio']:.3f} (pairs {pairs['ratio_range'][0]:.3f}-{pairs['ratio_range'][1]:.3f})")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
