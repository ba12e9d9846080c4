"""What `model.offload_activations` costs in time: SFT with gradient checkpointing, without and with the
checkpointed layer inputs offloaded, side by side on 2 CPU ranks, as a ratio.

On CPU ranks "host" and "device" are one memory: the offload is a memory-to-memory copy of each layer's
input in the forward (and the copy handed back in the backward), so this measures the mechanism's own
overhead (the saved-tensor hooks and the copies), not a PCIe transfer; on a GPU the copies cross PCIe
(pipeline.fit's cost model prices them at its `HOST_LINK_BYTES_PER_S`). Runs alternate, each pair in
the other order, so machine noise hits both alike; the first `--warmup` steps of each are dropped.

    python -m benchmarks.activation_offload [--steps 12] [--warmup 3] [--repeats 2] [--hidden 1024]
        [--layers 4] [--keep DIR] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.stage_throughput import (LAUNCH_TIMEOUT_S, MIB, WORLD_SIZE, launch, load_demo_tokenizer,
                                         model_config, parameter_count, read_steps, write_stage_config)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating which goes first")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--keep", metavar="DIR", help="keep configs, run dirs and logs here")
    parser.add_argument("--json", metavar="PATH", help="also write the summary as JSON here")
    args = parser.parse_args()
    if args.steps <= args.warmup or args.repeats <= 0:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}, and --repeats be positive")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="activation_offload-") as temp:
        root = Path(args.keep).resolve() if args.keep else Path(temp)
        root.mkdir(parents=True, exist_ok=True)
        config = model_config(args.hidden, args.layers)
        parameters = parameter_count(config, load_demo_tokenizer())
        print(f"SFT, Llama hidden {args.hidden}, {args.layers} layers, {parameters:,} parameters (fp32), ZeRO-2, "
              f"Adam-mini, {WORLD_SIZE} CPU ranks x 1 thread, {args.steps} steps per run (first {args.warmup} "
              f"dropped), {args.repeats} run(s) per variant", flush=True)
        config_path = write_stage_config("sft", root / "sft.yaml", config, args.steps, None)
        runs = {name: [] for name in VARIANTS}
        for repeat in range(args.repeats):
            for name in (list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]):
                runs[name].append(run(name, repeat, config_path, root, args))
                print(f"  {name} run {repeat}: {'failed' if 'failed' in runs[name][-1] else 'done'}", flush=True)
    summary = {name: summarise(variant_runs) for name, variant_runs in runs.items()}
    base, offloaded = summary["checkpointing"], summary["checkpointing + offload"]
    print(f"\n{'variant':<26}{'step ms':>10}{'tokens/s':>10}{'peak RSS MiB':>14}")
    for name, row in summary.items():
        print(f"{name:<26}" + ("failed: " + row["failed"] if "failed" in row else
                               f"{row['step_ms']:>10.1f}{row['tokens_per_s']:>10.0f}{row['peak_rss_mib']:>14.1f}"))
    if "failed" not in base and "failed" not in offloaded:
        summary["offload_vs_checkpointing"] = {key: offloaded[key] / base[key]
                                               for key in ("step_ms", "tokens_per_s", "peak_rss_mib")}
        ratio = summary["offload_vs_checkpointing"]
        print(f"offload / checkpointing alone: step time x{ratio['step_ms']:.3f}, tokens/s x{ratio['tokens_per_s']:.3f}, "
              f"peak RSS x{ratio['peak_rss_mib']:.3f} (CPU: the copies are memory-to-memory)")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "parameters": parameters, "summary": summary,
                                               "runs": runs}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
