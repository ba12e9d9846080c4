"""The demo's GRPO trained on the task's gold reward (the `demo_gold` reward function, no reward model) and
on the demo's reward model, as configs/tiny/grpo.yaml ships it (less 3 for an answer cut by
`max_new_tokens`) and without that missing-eos penalty; from the same SFT policy, seeds 0, 1, 2, on 2
CPU ranks.

Per run: the held-out greedy gold reward along training (`eval/gold_reward`, every arm logs it), and the
final policy scored by `pipeline.evaluate policy` on the 64 held-out prompts as every demo policy is:
greedy and sampled gold reward, the reward model's raw score of the greedy answers (no penalty), the
share of them cut by the length limit, KL to the SFT policy. Per arm: mean ± std over the seeds (sample
std), and whether a reward-model arm's final gold reward differs from the gold arm's beyond seed noise
(a two-sample t-test at 5%). The figure: the gold curves of every arm (mean, min-max band over the
seeds), and each final policy's gold reward against its reward-model score. Reward-model
over-optimisation shows as policies the reward model scores above the gold-trained ones whose gold
reward is no higher, or lower.

    python -m benchmarks.compare_rewards [--sft DIR] [--reward DIR] [--seeds 0,1,2] [--max-steps 30]
        [--keep DIR] [--table PATH] [--figure PATH] [--json PATH]

Without `--sft` and `--reward` the demo's SFT and reward models are trained first, as
training_scripts/demo.sh trains them.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.rollout_speed import LAUNCH_TIMEOUT_S, demo_model, log_tail, read_metrics
from benchmarks.stage_throughput import REPO_ROOT, launch_script, work_directory
from pipeline.evaluate import seed_band
from pipeline.seeds import compare_seeds, mean_std

SCRIPT, CONFIG = "training_scripts/po/grpo/run_grpo.sh", "configs/tiny/grpo.yaml"
GOLD = "gold (demo_gold)"
# What each arm trains on: (its run directories' prefix, overrides of CONFIG; {reward}: the reward model's export).
ARMS = {
    "reward model": ("reward", ["grpo.reward_model_path={reward}"]),
    "reward model, no missing-eos penalty": ("reward_no_penalty", ["grpo.reward_model_path={reward}",
                                                                   "grpo.missing_eos_penalty=null"]),
    GOLD: ("gold", ["grpo.reward_model_path=null", "reward.functions=[{name: demo_gold}]",
                    "grpo.missing_eos_penalty=null"]),  # the gold rule scores long answers itself
}


def run_arm(arm: str, seed: int, root: Path, sft: Path, reward: Path, max_steps: int) -> dict:
    """One GRPO run of `arm` and its final policy's scores, or `failed` with the reason."""
    prefix, arm_overrides = ARMS[arm]
    run_dir = root / f"{prefix}-seed{seed}"
    overrides = [f"output_dir={run_dir}", f"model.path={sft}", f"seed={seed}", f"training.max_steps={max_steps}",
                 "checkpoint.overwrite=true", *(value.replace("{reward}", str(reward)) for value in arm_overrides)]
    log = root / f"{run_dir.name}.log"
    started = time.perf_counter()
    failure = launch_script(SCRIPT, CONFIG, overrides, log, LAUNCH_TIMEOUT_S)
    run = {"arm": arm, "seed": seed, "wall_s": time.perf_counter() - started, "run_dir": str(run_dir)}
    if failure is None:
        scores = run_dir / "eval_policy.json"
        command = [sys.executable, "-m", "pipeline.evaluate", "policy", "--config", "configs/tiny/eval_policy.yaml",
                   f"policy_path={run_dir / 'final'}", f"reward_model_path={reward}", f"baseline_policy_path={sft}",
                   f"ref_model_path={sft}", f"output={scores}", "missing_eos_penalty=null"]  # the raw score
        with open(log, "a", encoding="utf-8") as output:
            code = subprocess.run(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT).returncode
        if code != 0:
            failure = f"pipeline.evaluate policy exited {code}"
        else:
            return {**run, **run_scores(read_metrics(run_dir), json.loads(scores.read_text(encoding="utf-8")))}
    print(f"\n{run_dir.name} FAILED ({failure}); last output:\n{log_tail(log)}\n", flush=True)
    return {**run, "failed": failure}


def run_scores(rows: list, policy: dict) -> dict:
    """A run's held-out gold curve (step -> greedy gold reward) and its final policy's scores."""
    curve = {row["step"]: row["eval/gold_reward"] for row in rows if "eval/gold_reward" in row}
    if not curve:
        raise ValueError("the run logged no eval/gold_reward")
    return {"gold_curve": curve, "final_gold": curve[max(curve)], "best_gold": max(curve.values()),
            "greedy_gold": policy["greedy"]["gold_reward"], "sampled_gold": policy["sampled"]["gold_reward"],
            "greedy_reward_model": policy["greedy"]["reward_mean"], "kl": policy["kl"],
            "greedy_cut": policy["greedy"]["missing_eos_fraction"],
            "sft_gold": policy["baseline_greedy"]["gold_reward"],
            "sft_reward_model": policy["baseline_greedy"]["reward_mean"]}


SCORES = ("greedy_gold", "sampled_gold", "greedy_reward_model", "greedy_cut", "kl", "best_gold")


def arm_rows(runs: list) -> list:
    """Per arm: mean and sample std over its seeds of each score; each reward-model arm's row carries the
    t-test of its final greedy gold reward against the gold arm's (`vs_gold`: difference = arm - gold)."""
    rows = {}
    for arm in ARMS:
        done = [run for run in runs if run["arm"] == arm and "failed" not in run]
        if done:
            rows[arm] = {"arm": arm, "seeds": [run["seed"] for run in done],
                         **{name: mean_std([run[name] for run in done]) for name in SCORES},
                         "greedy_gold_values": [run["greedy_gold"] for run in done]}
    for arm, row in rows.items():
        if arm != GOLD and GOLD in rows:
            row["vs_gold"] = compare_seeds(rows[GOLD]["greedy_gold_values"], row["greedy_gold_values"])
    return list(rows.values())


def table(rows: list, runs: list) -> str:
    """Markdown: the SFT policy's scores, then mean ± std per arm."""
    header = ("trained on", "seeds", "greedy gold (held out)", "sampled gold", "greedy reward-model score",
              "greedy answers cut", "KL to SFT", "best eval gold")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = next((run for run in runs if "failed" not in run), None)
    if first is not None:
        lines.append(f"| (SFT policy, the start) | | {first['sft_gold']:.3f} | | {first['sft_reward_model']:.2f} "
                     "| | | |")
    for row in rows:
        cells = [row["arm"], ",".join(map(str, row["seeds"]))]
        for name, digits in zip(SCORES, (3, 3, 2, 2, 2, 3)):
            mean, std = row[name]
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Greedy gold, {row['arm']} minus gold: {row['vs_gold']['difference']:+.3f} (t {row['vs_gold']['t']:+.2f}, "
             f"{row['vs_gold']['df']} df: {'within' if row['vs_gold']['within_noise'] else 'beyond'} seed noise at 5%)."
             for row in rows if row.get("vs_gold") and row["vs_gold"]["t"] is not None]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def figure(runs: list, path: Path) -> None:
    """Left: held-out greedy gold reward against step per arm (mean line, min-max band over seeds). Right:
    each final policy's greedy gold reward against its greedy reward-model score, and the SFT policy's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [run for run in runs if "failed" not in run]
    figure_, (curves, scatter) = plt.subplots(1, 2, figsize=(11, 4))
    for color, arm in zip(("tab:orange", "tab:red", "tab:blue"), ARMS):
        arm_runs = [run for run in done if run["arm"] == arm]
        if not arm_runs:
            continue
        steps, _, mean, low, high = seed_band([(sorted(curve), sorted(curve), [curve[step] for step in sorted(curve)])
                                               for curve in (run["gold_curve"] for run in arm_runs)])
        curves.plot(steps, mean, color=color, linewidth=2, marker="o", label=f"GRPO on the {arm}")
        curves.fill_between(steps, low, high, color=color, alpha=0.2)
        scatter.scatter([run["greedy_reward_model"] for run in arm_runs], [run["greedy_gold"] for run in arm_runs],
                        color=color, label=f"on the {arm}")
    if done:
        scatter.scatter([done[0]["sft_reward_model"]], [done[0]["sft_gold"]], color="gray", marker="x",
                        label="SFT policy")
    curves.set(xlabel="step", ylabel="held-out greedy gold reward", title="gold reward along training")
    scatter.set(xlabel="reward-model score, no penalty (greedy, held out)", ylabel="gold reward (greedy, held out)",
                title="final policies, one point per seed")
    for axes in (curves, scatter):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure_.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure_.savefig(path, dpi=100)
    plt.close(figure_)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=Path, help="the demo's SFT export (default: trained here first)")
    parser.add_argument("--reward", type=Path, help="the demo's reward export (default: trained here first)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    parser.add_argument("--max-steps", type=int, default=30, help="GRPO steps per run (default 30; the config's 60)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep models, run dirs and logs here")
    parser.add_argument("--table", type=Path, metavar="PATH", help="also write the table (markdown) here")
    parser.add_argument("--figure", type=Path, metavar="PATH", default=Path("compare_rewards.png"),
                        help="the figure (PNG; default compare_rewards.png)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every run's figures as JSON here")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds is {args.seeds!r}; give comma-separated integers, e.g. 0,1,2")
    if args.max_steps <= 0:
        parser.error(f"--max-steps is {args.max_steps}; it must be positive")
    for name in ("sft", "reward"):
        path = getattr(args, name)
        if path is not None and not (path / "config.json").is_file():
            parser.error(f"--{name} {path} holds no config.json; give a Hugging Face export (a run's final/)")
    return args


def run_all(args, root: Path) -> dict:
    sft = args.sft.resolve() if args.sft else demo_model("sft", root)
    reward = args.reward.resolve() if args.reward else demo_model("reward", root, sft)
    runs = []
    for index, seed in enumerate(args.seeds):
        arms = list(ARMS)
        for arm in arms[index % len(arms):] + arms[:index % len(arms)]:  # the arms take turns to go first
            run = run_arm(arm, seed, root, sft, reward, args.max_steps)
            if "failed" not in run:
                print(f"  {arm}, seed {seed}: held-out greedy gold {run['greedy_gold']:.3f}, reward-model score "
                      f"{run['greedy_reward_model']:.2f}, cut {run['greedy_cut']:.2f}, KL {run['kl']:.2f}, "
                      f"{run['wall_s']:.0f} s", flush=True)
            runs.append(run)
    return {"max_steps": args.max_steps, "runs": runs, "rows": arm_rows(runs)}


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    with work_directory(args.keep, "compare_rewards-") as root:
        report = run_all(args, root)
    text = table(report["rows"], report["runs"])
    print(f"\nGRPO on the demo, {report['max_steps']} steps, 2 ranks:\n\n{text}")
    figure(report["runs"], args.figure)
    print(f"figure: {args.figure}; total wall time {time.perf_counter() - started:.0f} s")
    if args.table:
        args.table.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0 if all("failed" not in run for run in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
