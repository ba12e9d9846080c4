"""Learning-rate sensitivity: Adam-mini against AdamW over a range of learning rates and seeds, on the
demo task's three stages, each judged by its held-out figure.

The Adam-mini paper's second claim is that it is less sensitive to the learning rate than AdamW. Here
each stage runs with its demo config at its default learning rate times each of `--factors`, under
both optimizers and `--seeds` seeds (2 CPU ranks, the stage scripts as the demo runs them):
- SFT from scratch, judged by the final held-out loss (lower is better);
- the reward model, from one SFT policy (the demo's, trained here once at its defaults), judged by the
  final held-out pairwise accuracy;
- ReMax, from that SFT policy and one reward model (the demo's, trained here once), judged by the final
  held-out greedy gold reward.
Only the swept stage changes; what it starts from is the same for every run. It prints, per stage, each
optimizer's mean ± std over the seeds at every learning rate, the two optimizers compared at each rate
(a two-sample t-test, 5%), and each optimizer's spread across the rates (best mean minus worst mean),
and draws the final figure against the learning rate per optimizer, mean ± std over the seeds.

    python -m benchmarks.lr_sweep [--stages sft,reward,remax] [--factors 0.333,1,3] [--seeds 3]
        [--out DIR] [--keep DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import yaml

from pipeline.provenance import provenance
from benchmarks.stage_throughput import launch_script, work_directory
from pipeline.seeds import compare_seeds, mean_std

REPO_ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adamw", "adam_mini")
LAUNCH_TIMEOUT_S = 1800


@dataclasses.dataclass(frozen=True)
class Stage:
    script: str
    config: str            # the demo config the sweep starts from
    metric: str            # the held-out figure that judges a run: its last logged value
    higher_is_better: bool

    @property
    def default_lr(self) -> float:
        return float(yaml.safe_load((REPO_ROOT / self.config).read_text())["optim"]["lr"])


STAGES = {"sft": Stage("training_scripts/sft/run_sft_full.sh", "configs/tiny/sft_full.yaml", "eval/loss", False),
          "reward": Stage("training_scripts/reward/run_reward.sh", "configs/tiny/reward.yaml", "eval/accuracy", True),
          "remax": Stage("training_scripts/po/remax/run_remax.sh", "configs/tiny/remax.yaml", "eval/gold_reward", True)}


def final_value(run_dir: Path, metric: str) -> float:
    """The metric's last logged value in the run's metrics.jsonl."""
    values = [row[metric] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if isinstance(row.get(metric), (int, float))]
    if not values:
        raise RuntimeError(f"{run_dir}/metrics.jsonl logs no {metric}")
    return float(values[-1])


def run_stage(stage: str, overrides: list, run_dir: Path) -> None:
    """One run of `stage` into `run_dir`; RuntimeError with its log's tail when it fails."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.log"
    failure = launch_script(STAGES[stage].script, STAGES[stage].config,
                            [f"output_dir={run_dir}", "checkpoint.overwrite=true", *overrides], log, LAUNCH_TIMEOUT_S)
    if failure:
        raise RuntimeError(f"{stage} ({' '.join(overrides)}) {failure}:\n{log.read_text()[-3000:]}")


def starting_points(root: Path, stages: list) -> dict:
    """The overrides that give each swept stage what it starts from: the demo's SFT policy (and reward
    model), trained once here at their defaults with Adam-mini, seed 0."""
    sft, reward = root / "base" / "sft", root / "base" / "reward"
    if "reward" in stages or "remax" in stages:
        run_stage("sft", ["seed=0"], sft)
    if "remax" in stages:
        run_stage("reward", ["seed=0", f"model.path={sft}/final"], reward)
    return {"sft": [], "reward": [f"model.path={sft}/final"],
            "remax": [f"model.path={sft}/final", f"remax.reward_model_path={reward}/final"]}


def sweep(root: Path, stages: list, factors: list, seeds: int) -> list:
    """Every (stage, optimizer, factor, seed) run; a row each with its final held-out figure."""
    starts = starting_points(root, stages)
    rows = []
    for stage in stages:
        for factor in factors:
            lr = STAGES[stage].default_lr * factor
            for optimizer in OPTIMIZERS:
                for seed in range(seeds):
                    run_dir = root / stage / f"{optimizer}-lr{factor:g}-seed{seed}"
                    started = time.monotonic()
                    run_stage(stage, [*starts[stage], f"optim.name={optimizer}", f"optim.lr={lr:.6g}", f"seed={seed}"],
                              run_dir)
                    value = final_value(run_dir, STAGES[stage].metric)
                    rows.append({"stage": stage, "optimizer": optimizer, "factor": factor, "lr": lr, "seed": seed,
                                 "value": value, "seconds": time.monotonic() - started})
                    print(f"{stage} {optimizer} lr {lr:.3g} seed {seed}: {STAGES[stage].metric} {value:.4f}", flush=True)
    return rows


def summarize(rows: list) -> dict:
    """{stage: {"factors", "lrs", "metric", "cells": {optimizer: [(mean, std, n)] per factor}, "spread":
    {optimizer: best mean - worst mean}, "compared": [compare_seeds(adamw, adam_mini)] per factor}}."""
    result = {}
    for stage in dict.fromkeys(row["stage"] for row in rows):
        mine = [row for row in rows if row["stage"] == stage]
        factors = sorted({row["factor"] for row in mine})
        values = {(opt, factor): [row["value"] for row in mine if (row["optimizer"], row["factor"]) == (opt, factor)]
                  for opt in OPTIMIZERS for factor in factors}
        cells = {opt: [(*mean_std(values[opt, factor]), len(values[opt, factor])) for factor in factors]
                 for opt in OPTIMIZERS}
        spread = {opt: max(mean for mean, _, _ in cells[opt]) - min(mean for mean, _, _ in cells[opt])
                  for opt in OPTIMIZERS}
        compared = [compare_seeds(values["adamw", factor], values["adam_mini", factor]) for factor in factors]
        result[stage] = {"factors": factors, "lrs": [STAGES[stage].default_lr * f for f in factors],
                         "metric": STAGES[stage].metric, "cells": cells, "spread": spread, "compared": compared}
    return result


def markdown(summary: dict) -> str:
    """The sweep as Markdown: a table per stage and a sentence on which optimizer varied less."""
    lines = []
    for stage, found in summary.items():
        better = "higher" if STAGES[stage].higher_is_better else "lower"
        header = ["optimizer"] + [f"lr {lr:.3g} (x{factor:g})" for lr, factor in zip(found["lrs"], found["factors"])]
        lines += [f"**{stage}**: final `{found['metric']}` ({better} is better), mean ± std over the seeds", "",
                  "| " + " | ".join(header + ["spread across rates"]) + " |", "|---" * (len(header) + 1) + "|"]
        for opt in OPTIMIZERS:
            cells = [f"{mean:.4g} ± {std:.2g}" for mean, std, _ in found["cells"][opt]]
            lines.append(f"| {opt} | " + " | ".join(cells) + f" | {found['spread'][opt]:.3g} |")
        verdicts = []
        for lr, comparison in zip(found["lrs"], found["compared"]):
            if comparison["within_noise"] is not None:
                verdicts.append(f"lr {lr:.3g}: Adam-mini {round(comparison['difference'], 12) + 0.0:+.3g} "
                                f"({'within' if comparison['within_noise'] else 'beyond'} the seed spread)")
        lines += ["", "; ".join(verdicts) + "." if verdicts else "One seed: no spread to compare with.",
                  sensitivity(found), ""]
    return "\n".join(lines)


def sensitivity(found: dict) -> str:
    """Which optimizer's mean moves less across the rates; spreads closer than the largest seed std of
    any cell are called alike, since the seeds alone move a mean about that much."""
    spread_mini, spread_adamw = found["spread"]["adam_mini"], found["spread"]["adamw"]
    if len(found["factors"]) < 2:
        return "One learning rate: nothing to say about sensitivity."
    said = f"Spread of the mean across these rates: Adam-mini {spread_mini:.3g}, AdamW {spread_adamw:.3g}"
    noise = max(std for opt in OPTIMIZERS for _, std, _ in found["cells"][opt])
    if abs(spread_mini - spread_adamw) <= noise:
        return f"{said}; alike within the largest seed std ({noise:.2g})."
    return f"{said}; {'Adam-mini' if spread_mini < spread_adamw else 'AdamW'} varies less."


def plot(summary: dict, path: Path) -> None:
    """The final figure against the learning rate (log scale), one panel per stage, each optimizer's
    mean over the seeds with a ±1 std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(summary), figsize=(4.2 * len(summary), 3.4), squeeze=False)
    for panel, (stage, found) in zip(axes[0], summary.items()):
        for opt in OPTIMIZERS:
            means = [mean for mean, _, _ in found["cells"][opt]]
            panel.plot(found["lrs"], means, marker="o", label=opt)
            low = [mean - std for mean, std, _ in found["cells"][opt]]
            high = [mean + std for mean, std, _ in found["cells"][opt]]
            panel.fill_between(found["lrs"], low, high, alpha=0.2)
        panel.set_xscale("log")
        panel.minorticks_off()  # log-scale minor labels overlap over a range this short
        panel.set_xticks(found["lrs"], [f"{lr:.2g}" for lr in found["lrs"]])
        panel.set_xlabel("learning rate")
        panel.set_title(f"{stage}: final {found['metric']}")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=8, title="mean ± std over seeds", title_fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="sft,reward,remax", help="comma-separated, from sft, reward, remax")
    parser.add_argument("--factors", default="0.333,1,3", help="multiples of each stage's default learning rate")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per optimizer and rate")
    parser.add_argument("--out", default="runs/lr_sweep", help="where lr_sweep.md, .json and .png go")
    parser.add_argument("--keep", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    args.stages = args.stages.split(",")
    unknown = [stage for stage in args.stages if stage not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; use sft, reward, remax")
    try:
        args.factors = [float(factor) for factor in args.factors.split(",")]
    except ValueError:
        parser.error(f"--factors is {args.factors!r}; give comma-separated numbers")
    if args.seeds < 1 or any(not factor > 0 or not math.isfinite(factor) for factor in args.factors):
        parser.error("--seeds must be at least 1 and every --factors value positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, source = time.monotonic(), provenance()  # the code the runs start from
    try:
        with work_directory(args.keep, "lr_sweep-") as root:
            rows = sweep(root, args.stages, args.factors, args.seeds)
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = summarize(rows)
    text = markdown(summary) + f"\nFrom `python -m benchmarks.lr_sweep` ({len(rows)} runs), {source}.\n"
    (out / "lr_sweep.md").write_text(text, encoding="utf-8")
    (out / "lr_sweep.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    plot(summary, out / "lr_sweep.png")
    print(text)
    print(f"{len(rows)} runs in {time.monotonic() - started:.0f} s; {out}/lr_sweep.md, lr_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
