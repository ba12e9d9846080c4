"""Reward curves and summaries of finished runs.

    python -m pipeline.evaluate curves RUN_DIR [RUN_DIR ...] --out DIR [--smoothing 0.6]

Reads each run's `metrics.jsonl`, plots every known metric against step with the runs
overlaid (raw thin, smoothed thick; legend from the run directory names), and writes one
PNG per metric plus `summary.md`. Runs of different lengths or with missing metrics are
handled and reported.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Plotted when present, in this order: ReMax first, then SFT and reward-model training.
METRICS = ("eval/reward", "eval/gold_reward", "reward", "baseline_reward", "gold_reward", "eval/kl", "kl",
           "response_length", "eval/sampled_reward", "loss", "eval/loss", "accuracy", "eval/accuracy")


class EvaluateError(ValueError):
    """A run directory that cannot be read; the message names the file."""


def read_metrics(run_dir) -> tuple:
    """(rows, problems): the parsed lines of `run_dir/metrics.jsonl` and the lines it skipped.

    Raises:
        EvaluateError: the file is missing or holds no readable line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise EvaluateError(f"{path}: no metrics file (is {run_dir} a run directory?)")
    rows, problems = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{path}: line {number} is not JSON (a run cut off mid-write?); skipped")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            problems.append(f"{path}: line {number} has no integer step; skipped")
            continue
        rows.append(row)
    if not rows:
        raise EvaluateError(f"{path}: no readable metrics")
    return rows, problems


def series(rows: list, name: str) -> tuple:
    """(steps, values) of one metric, in step order; a step logged twice keeps its last value."""
    points = {row["step"]: float(row[name]) for row in rows
              if isinstance(row.get(name), (int, float)) and math.isfinite(row[name])}
    steps = sorted(points)
    return steps, [points[step] for step in steps]


def smooth(values: list, weight: float) -> list:
    """Exponential moving average with TensorBoard's bias correction (the first points are not dragged to 0)."""
    smoothed, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight ** index) if weight < 1 else value)
    return smoothed


def area_under(steps: list, values: list) -> float:
    """Trapezoid area under a curve over its steps (nan with fewer than two points)."""
    if len(steps) < 2:
        return math.nan
    return sum((b - a) * (u + v) / 2 for a, b, u, v in zip(steps, steps[1:], values, values[1:]))


def summarize(rows: list) -> dict:
    """Headline figures of one run; metrics it never logged come out as None."""
    steps, rewards = series(rows, "eval/reward")
    summary = {"last_step": max(row["step"] for row in rows), "first_eval_reward": None, "final_eval_reward": None, "best_eval_reward": None,
               "best_step": None, "kl_at_best": None, "eval_reward_auc": None}
    if rewards:
        best = max(range(len(rewards)), key=rewards.__getitem__)
        kl = dict(zip(*series(rows, "eval/kl")))
        summary.update(first_eval_reward=rewards[0], final_eval_reward=rewards[-1], best_eval_reward=rewards[best], best_step=steps[best],
                       kl_at_best=kl.get(steps[best]), eval_reward_auc=area_under(steps, rewards))
    for name in ("eval/gold_reward", "eval/loss", "eval/accuracy"):
        values = series(rows, name)[1]
        summary[f"first_{name}"] = values[0] if values else None
        summary[f"final_{name}"] = values[-1] if values else None
    step_times = series(rows, "step_time")[1]
    memory = series(rows, "peak_memory_bytes")[1]
    summary["train_seconds"] = sum(step_times) if step_times else None
    summary["peak_memory_bytes"] = max(memory) if memory else None
    return summary


def plot_curves(runs: dict, out_dir: Path, smoothing: float) -> list:
    """One PNG per metric any run logged, all runs overlaid; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name in METRICS:
        curves = {run: series(rows, name) for run, rows in runs.items()}
        curves = {run: curve for run, curve in curves.items() if curve[0]}
        if not curves:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.6))
        for index, (run, (steps, values)) in enumerate(curves.items()):
            color = colors[index % len(colors)]
            axes.plot(steps, values, color=color, alpha=0.3, linewidth=1)
            axes.plot(steps, smooth(values, smoothing), color=color, linewidth=2, label=run)
        axes.set_xlabel("step")
        axes.set_title(name)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / f"{name.replace('/', '_')}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_summary(summaries: dict, problems: list, out_dir: Path) -> Path:
    columns = ["first_eval_reward", "final_eval_reward", "best_eval_reward", "best_step", "kl_at_best", "eval_reward_auc",
               "first_eval/gold_reward", "final_eval/gold_reward", "final_eval/loss", "final_eval/accuracy",
               "last_step", "train_seconds", "peak_memory_bytes"]
    lines = ["# Run summary", "", "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {run} | " + " | ".join(_cell(summary[c]) for c in columns) + " |"
              for run, summary in summaries.items()]
    if problems:
        lines += ["", "## Problems", ""] + [f"- {problem}" for problem in problems]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def curves(run_dirs: list, out_dir, smoothing: float = 0.6) -> dict:
    """Plots and summarises the runs; unreadable runs are reported, not fatal, unless none is left.

    Raises:
        EvaluateError: no run could be read.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, problems = {}, []
    paths = [Path(run_dir).resolve() for run_dir in run_dirs]
    # Runs are named by their directory; same-named stages of different runs (adamw/remax,
    # adam_mini/remax) by their parent too.
    unique = len({path.name for path in paths}) == len(paths)
    for run_dir, path in zip(run_dirs, paths):
        name = path.name if unique else f"{path.parent.name}/{path.name}"
        try:
            runs[name], skipped = read_metrics(run_dir)
            problems += skipped
        except EvaluateError as error:
            problems.append(str(error))
    if not runs:
        raise EvaluateError("no run could be read:\n" + "\n".join(problems))
    summaries = {run: summarize(rows) for run, rows in runs.items()}
    lengths = {summary["last_step"] for summary in summaries.values()}
    if len(lengths) > 1:
        problems.append(f"runs end at different steps ({', '.join(map(str, sorted(lengths)))}); curves are overlaid as logged")
    for name in ("eval/reward", "loss", "eval/loss"):
        have = [run for run, rows in runs.items() if series(rows, name)[0]]
        if have and len(have) < len(runs):
            missing = sorted(set(runs) - set(have))
            problems.append(f"`{name}` is missing from {', '.join(missing)}")
    return {"plots": plot_curves(runs, out_dir, smoothing), "summary": write_summary(summaries, problems, out_dir),
            "summaries": summaries, "problems": problems}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    curve_parser = commands.add_parser("curves", help="plot and summarise runs")
    curve_parser.add_argument("runs", nargs="+", help="run directories (each holding metrics.jsonl)")
    curve_parser.add_argument("--out", required=True, help="directory for the PNGs and summary.md")
    curve_parser.add_argument("--smoothing", type=float, default=0.6, help="EMA weight in [0, 1)")
    args = parser.parse_args(argv)
    if not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing is {args.smoothing}; use a value in [0, 1)")
    try:
        result = curves(args.runs, args.out, args.smoothing)
    except EvaluateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in result["problems"]:
        print(f"note: {problem}", file=sys.stderr)
    print(result["summary"].read_text(encoding="utf-8"))
    print(f"{len(result['plots'])} plots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
