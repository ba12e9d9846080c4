"""Reward curves and summaries of finished runs, and a policy scored on held-out prompts.

    python -m pipeline.evaluate curves RUN_DIR [RUN_DIR ...] --out DIR [--smoothing 0.6]
    python -m pipeline.evaluate policy --config configs/tiny/eval_policy.yaml [key=value ...] [--debug]

`curves` reads each run's `metrics.jsonl`, plots every known metric against step with the runs
overlaid (held-out evaluations as logged, with markers; per-step metrics raw and smoothed, the
smoothing in the legend; runs that differ only by seed as their mean with a min-max band; legend
from the run directory names), and writes one PNG per metric plus `summary.md` (each run's figures,
each seed group's mean ± std, and each policy-optimisation run's reward-hacking signals). Runs of
different lengths or with missing metrics are handled and reported.

`policy` answers each prompt greedily and by sampling, in one process without DeepSpeed, and
reports the reward model's mean and std score of each, the mean response length, the greedy win
rate against a baseline policy, the KL to a reference policy and optionally a gold reward; it
writes them as JSON and prints a table.
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

from pipeline.chunked_logits import LOGITS_CHUNK, chunk_problem
from pipeline.config import ConfigError, load_config
from pipeline.provenance import provenance
from pipeline.seeds import compare_seeds, read_run_config, seed_groups
from pipeline.seeds import mean_std as seed_mean_std

logger = logging.getLogger(__name__)

# Plotted when present, in this order: ReMax (RLOO, GRPO) first, then SFT and reward-model training, then DPO.
METRICS = ("eval/reward", "eval/gold_reward", "reward", "baseline_reward", "gold_reward", "eval/kl", "kl",
           "response_length", "eval/sampled_reward", "k3_kl", "clip_fraction", "loss", "eval/loss", "accuracy", "eval/accuracy",
           "rewards/margins", "eval/rewards/margins", "rewards/accuracy", "eval/rewards/accuracy")

WALL_CLOCK_METRICS = ("eval/gold_reward", "eval/reward", "eval/kl")


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
    gold_steps, gold = series(rows, "eval/gold_reward")
    best_gold = max(range(len(gold)), key=gold.__getitem__) if gold else None
    summary["best_eval/gold_reward"] = gold[best_gold] if gold else None
    summary["best_gold_step"] = gold_steps[best_gold] if gold else None
    kls = series(rows, "eval/kl")[1]
    summary["final_eval/kl"] = kls[-1] if kls else None
    state = series(rows, "optimizer_state_bytes")[1]
    summary["optimizer_state_bytes"] = max(state) if state else None
    step_times = series(rows, "step_time")[1]
    optimizer_times = series(rows, "optimizer_step_time")[1]
    memory = series(rows, "peak_memory_bytes")[1]
    summary["train_seconds"] = sum(step_times) if step_times else None
    # The optimizer's share of it (engine.step()): where AdamW and Adam-mini runs differ in time.
    summary["optimizer_seconds"] = sum(optimizer_times) if optimizer_times else None
    summary["peak_memory_bytes"] = max(memory) if memory else None
    return summary


def plot_curves(runs: dict, groups: dict, out_dir: Path, smoothing: float) -> list:
    """One PNG per metric any run logged, the groups overlaid (a run alone, or the mean of a group's seeds
    with their min-max band); returns the files written. Evaluations (`eval/...`, a few points) are drawn
    as logged, with markers; per-step metrics raw (faint) and smoothed, the smoothing named in the legend."""
    written = []
    for name in METRICS:
        curves = {label: [series(runs[run], name) for run in members] for label, members in groups.items()}
        curves = {label: [(steps, steps, values) for steps, values in group] for label, group in curves.items()}
        written += _plot(curves, name, "step", out_dir / f"{name.replace('/', '_')}.png", smoothing)
    for name in WALL_CLOCK_METRICS:  # the same curves against training time: algorithms differ in cost per step
        curves = {label: [(series(runs[run], name)[0], *wall_clock_series(runs[run], name)) for run in members]
                  for label, members in groups.items()}
        written += _plot(curves, name, "training time (s, summed step times)",
                         out_dir / f"{name.replace('/', '_')}_vs_time.png", smoothing)
    return written


def seed_band(curves: list) -> tuple:
    """(steps, mean x, mean, min, max) over a group's (steps, xs, values) curves, at the steps all of
    them logged."""
    common = sorted(set.intersection(*(set(steps) for steps, _, _ in curves)))
    at = [dict(zip(steps, zip(xs, values))) for steps, xs, values in curves]
    xs = [sum(points[step][0] for points in at) / len(at) for step in common]
    columns = [[points[step][1] for points in at] for step in common]
    return (common, xs, [sum(column) / len(column) for column in columns], [min(column) for column in columns],
            [max(column) for column in columns])


def _plot(curves: dict, title: str, xlabel: str, path: Path, smoothing: float) -> list:
    """Overlays each group's (steps, xs, values) curves in `path` (see plot_curves); [path], or [] when
    no run has the metric."""
    import matplotlib.pyplot as plt

    figure = curve_figure(curves, title, xlabel, smoothing)
    if figure is None:
        return []
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [path]


def curve_figure(curves: dict, title: str, xlabel: str, smoothing: float):
    """The figure of `_plot`, or None when no group has a point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: [curve for curve in group if curve[0]] for label, group in curves.items()}
    curves = {label: group for label, group in curves.items() if group}
    if not curves:
        return None
    evaluation = title.startswith("eval/")
    smoothed = not evaluation and smoothing > 0
    ema = f", EMA {smoothing:g} (raw faint)" if smoothed else ""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for index, (label, group) in enumerate(curves.items()):
        color = colors[index % len(colors)]
        marker = "o" if evaluation else None
        if smoothed:  # each run smoothed along its own steps, before any mean over seeds
            group = [(steps, xs, smooth(values, smoothing)) for steps, xs, values in group]
        if len(group) == 1:
            [(steps, xs, values)] = group
            if smoothed:
                axes.plot(xs, curves[label][0][2], color=color, alpha=0.3, linewidth=1)
            axes.plot(xs, values, color=color, linewidth=2, marker=marker, markersize=4, label=label + ema)
            continue
        steps, xs, mean, low, high = seed_band(group)
        axes.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
        axes.plot(xs, mean, color=color, linewidth=2, marker=marker, markersize=4,
                  label=f"{label}: mean of {len(group)} seeds, min-max band" + ema.replace(" (raw faint)", ""))
    axes.set_xlabel(xlabel)
    axes.set_title(title if evaluation else f"{title} (per step)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def wall_clock_series(rows: list, name: str) -> tuple:
    """(seconds, values) of one metric against training time: each point at the summed `step_time`
    of the steps up to its own (evaluation time left out, so the axis is the training's cost)."""
    timed = sorted(dict(zip(*series(rows, "step_time"))).items())
    if not timed:
        return [], []
    timed_steps = [step for step, _ in timed]
    elapsed = list(itertools.accumulate(seconds for _, seconds in timed))
    steps, values = series(rows, name)
    # An evaluation at step s comes after the steps up to s: the time summed through the last of them.
    at = [bisect.bisect_right(timed_steps, step) for step in steps]
    return [elapsed[i - 1] if i else 0.0 for i in at], values


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


SUMMARY_COLUMNS = ["first_eval_reward", "final_eval_reward", "best_eval_reward", "best_step", "kl_at_best",
                   "eval_reward_auc", "first_eval/gold_reward", "final_eval/gold_reward", "final_eval/loss",
                   "final_eval/accuracy", "last_step", "train_seconds", "optimizer_seconds", "peak_memory_bytes"]


# The figures whose differences between seed groups are tested, and which way is better.
HEADLINES = (("final_eval_reward", True), ("final_eval/gold_reward", True), ("final_eval/loss", False),
             ("final_eval/accuracy", True))


def seeds_cell(values: list) -> str:
    """A figure over a group's seeds: "mean ± sample std", with how many runs had it where some did not."""
    present = [value for value in values if isinstance(value, (int, float)) and math.isfinite(value)]
    if not present:
        return "-"
    if len(present) == 1:
        return _cell(float(present[0]))
    mean, std = seed_mean_std(present)
    return f"{mean:.4g} ± {std:.2g}" + (f" (n={len(present)})" if len(present) < len(values) else "")


def write_summary(summaries: dict, problems: list, out_dir: Path, groups: Optional[dict] = None,
                  signals: Optional[dict] = None) -> Path:
    """summary.md: a row per run; where runs differ only by seed, a row per group (mean ± std over its
    seeds, and how many); the reward-hacking signals of every policy-optimisation run; the problems."""
    columns = SUMMARY_COLUMNS
    lines = ["# Run summary", "", "| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {run} | " + " | ".join(_cell(summary[c]) for c in columns) + " |"
              for run, summary in summaries.items()]
    seeded = {label: members for label, members in (groups or {}).items() if len(members) > 1}
    if seeded:
        lines += ["", "## Seeds together", "",
                  "Runs whose configs differ only in `seed` (and where they write): each figure as the mean ± "
                  "sample standard deviation over the group's seeds.", "",
                  "| group | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
        lines += [f"| {label} | {len(members)} | " + " | ".join(seeds_cell([summaries[run][c] for run in members])
                                                          for c in columns) + " |"
                  for label, members in seeded.items()]
        for column, higher_is_better in HEADLINES:
            lines += differences_beyond_seeds(
                {label: [summaries[run][column] for run in members if summaries[run][column] is not None]
                 for label, members in (groups or {}).items()}, f"`{column}`", higher_is_better)
    signals = {run: found for run, found in (signals or {}).items() if found}
    if signals:
        lines += ["", "## Reward-hacking signals", "", SIGNALS_EXPLAINED, "",
                  "| run | " + " | ".join(SIGNAL_NAMES.values()) + " |", "|---" * (len(SIGNAL_NAMES) + 1) + "|"]
        for run, found in signals.items():
            cells = [("**FLAG** " if found[name]["flagged"] else "") + found[name]["value"] for name in SIGNAL_NAMES]
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
    if problems:
        lines += ["", "## Problems", ""] + [f"- {problem}" for problem in problems]
    lines += ["", f"Written by `python -m pipeline.evaluate curves`, {provenance()}."]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- reward-hacking signals ---------------------------------------------------------------------
# A run "looks good" by its reward-model score and is not: these are what to look at, each flagged
# past a stated threshold.
GOLD_GIVEN_BACK = 0.1     # gold fell by more than this share of what it had gained, while the score rose
LENGTH_CORRELATION = 0.7  # per-step reward and response length correlated at least this much
ENTROPY_COLLAPSE = 0.2    # the last steps' entropy below this share of the first steps'
SIGNAL_NAMES = {"score_up_gold_down": "reward-model score up, gold down", "length": "reward ~ length (r)",
                "kl": "held-out KL, final / max (budget)", "entropy": "entropy, last / first"}
SIGNALS_EXPLAINED = (f"Flagged: the held-out reward-model score rose after the gold reward's best evaluation while "
                     f"the gold reward gave back more than {GOLD_GIVEN_BACK:.0%} of what it had gained; the "
                     f"per-step reward and response length correlate at r >= {LENGTH_CORRELATION}; the held-out KL "
                     f"passed `evaluate.kl_budget`; the mean entropy of the last 3 steps fell below "
                     f"{ENTROPY_COLLAPSE:.0%} of the first 3 steps'.")


def pearson(xs: list, ys: list) -> Optional[float]:
    """Pearson's r, or None with fewer than 3 points or a constant side."""
    if len(xs) < 3:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    var_x, var_y = sum((x - mean_x) ** 2 for x in xs), sum((y - mean_y) ** 2 for y in ys)
    return cov / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else None


def hacking_signals(rows: list, kl_budget: Optional[float] = None) -> Optional[dict]:
    """{signal: {"value": text, "flagged": bool}} for a policy-optimisation run (one that logs
    `eval/reward`); None for any other run."""
    reward_steps, rewards = series(rows, "eval/reward")
    if not reward_steps:
        return None
    found = {}
    reward_at, gold_at = dict(zip(reward_steps, rewards)), dict(zip(*series(rows, "eval/gold_reward")))
    both = [step for step in reward_steps if step in gold_at]
    if len(both) >= 2:
        best = max(both, key=gold_at.__getitem__)
        last = both[-1]
        gained, given_back = gold_at[best] - gold_at[both[0]], gold_at[best] - gold_at[last]
        rose = reward_at[last] - reward_at[best]
        found["score_up_gold_down"] = {
            "value": f"score {reward_at[best]:.3g} -> {reward_at[last]:.3g}, gold {gold_at[best]:.3g} -> "
                     f"{gold_at[last]:.3g} (steps {best}-{last})" if last != best else "gold best at the end",
            "flagged": rose > 0 and given_back > 0 and given_back > GOLD_GIVEN_BACK * max(gained, 0.0)}
    else:
        found["score_up_gold_down"] = {"value": "- (no gold reward)", "flagged": False}
    lengths = dict(zip(*series(rows, "response_length")))
    paired = [(reward, lengths[step]) for step, reward in zip(*series(rows, "reward")) if step in lengths]
    r = pearson([reward for reward, _ in paired], [length for _, length in paired])
    found["length"] = {"value": "-" if r is None else f"{r:.2f}", "flagged": r is not None and r >= LENGTH_CORRELATION}
    kls = series(rows, "eval/kl")[1]
    budget = "none" if kl_budget is None else f"{kl_budget:g}"
    found["kl"] = {"value": f"{kls[-1]:.3g} / {max(kls):.3g} ({budget})" if kls else "-",
                   "flagged": bool(kls) and kl_budget is not None and max(kls) > kl_budget}
    entropy = series(rows, "entropy")[1]
    if len(entropy) >= 2:
        first, last = entropy[:3], entropy[-3:]
        ratio = (sum(last) / len(last)) / (sum(first) / len(first)) if sum(first) > 0 else None
        found["entropy"] = {"value": "-" if ratio is None else f"{ratio:.2f}",
                            "flagged": ratio is not None and ratio < ENTROPY_COLLAPSE}
    else:
        found["entropy"] = {"value": "-", "flagged": False}
    return found


def evaluation_kind(rows: list) -> tuple:
    """The eval metrics a run logs: runs of one stage share them (SFT: eval/loss, eval/perplexity; ReMax:
    eval/reward, ...), so only runs of one kind are held against each other."""
    return tuple(sorted({name for row in rows for name in row if name.startswith("eval/")}))


def comparison_problems(runs: dict, summaries: dict) -> list:
    """Runs of the same kind that end at different steps or miss a metric the others log. Runs of
    different stages (the demo's SFT, reward and ReMax) differ by design and are not reported."""
    # Timing and memory columns are logged by every stage alike; eval metrics define the kind.
    problems, kinds = [], {}
    for run, rows in runs.items():
        kinds.setdefault(evaluation_kind(rows), []).append(run)
    # A run that never evaluated (cut off early) could be of any kind: it is held against each.
    unknown = kinds.pop((), [])
    groups = [members + unknown for members in kinds.values()] or [unknown]
    for members in groups:
        if len(members) < 2:
            continue
        lengths = {summaries[run]["last_step"] for run in members}
        if len(lengths) > 1:
            problems.append(f"{', '.join(members)} end at different steps ({', '.join(map(str, sorted(lengths)))}); "
                            "curves are overlaid as logged")
        logged = {run: {name for row in runs[run] for name in row} for run in members}
        for name in sorted(set.union(*logged.values()) - set.intersection(*logged.values())):
            missing = [run for run in members if name not in logged[run]]
            problems.append(f"`{name}` is missing from {', '.join(missing)}")
    return problems


def curves(run_dirs: list, out_dir, smoothing: float = 0.6, kl_budget: Optional[float] = None) -> dict:
    """Plots and summarises the runs, runs that differ only by seed together (`pipeline.seeds`), with each
    policy-optimisation run's reward-hacking signals (KL against `kl_budget`, else the run's own
    `evaluate.kl_budget`); unreadable runs are reported, not fatal, unless none is left.

    Raises:
        EvaluateError: no run could be read.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, run_dir_of, problems = {}, {}, []
    paths = [Path(run_dir).resolve() for run_dir in run_dirs]
    # Runs are named by their directory; same-named stages of different runs (adamw/remax,
    # adam_mini/remax) by their parent too.
    unique = len({path.name for path in paths}) == len(paths)
    for run_dir, path in zip(run_dirs, paths):
        name = path.name if unique else f"{path.parent.name}/{path.name}"
        try:
            runs[name], skipped = read_metrics(run_dir)
            run_dir_of[name] = run_dir
            problems += skipped
        except EvaluateError as error:
            problems.append(str(error))
    if not runs:
        raise EvaluateError("no run could be read:\n" + "\n".join(problems))
    summaries = {run: summarize(rows) for run, rows in runs.items()}
    problems += comparison_problems(runs, summaries)
    configs = {name: read_run_config(run_dir) for name, run_dir in run_dir_of.items()}
    groups = seed_groups(configs)

    def budget(run: str) -> Optional[float]:
        section = configs[run].get("evaluate")
        return kl_budget if kl_budget is not None else (section.get("kl_budget") if isinstance(section, dict) else None)

    signals = {run: hacking_signals(rows, budget(run)) for run, rows in runs.items()}
    return {"plots": plot_curves(runs, groups, out_dir, smoothing), "groups": groups, "signals": signals,
            "summary": write_summary(summaries, problems, out_dir, groups, signals), "summaries": summaries,
            "problems": problems}


def algorithm_table(run_dirs: list, out: Path) -> str:
    """One row per policy-optimisation setting: the held-out scores of its final policy (`eval_policy.json`
    in the run directory, from `python -m pipeline.evaluate policy`), the best gold reward its own
    evaluations saw, and what it cost (training time, peak memory and optimizer state per rank). Runs that
    differ only by seed are one row, each figure their mean ± sample std; then which settings' final
    greedy gold differs from the best one's beyond what the seeds alone move (a two-sample t-test, 5%).

    Raises:
        EvaluateError: a run directory without readable metrics.
    """
    columns = ("seeds", "greedy gold (final)", "sampled gold (final)", "win rate vs SFT", "KL to SFT",
               "best eval gold (step)", "train s", "peak memory / rank (MiB)", "optimizer state / rank (MiB)")
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    baseline_gold, figures, configs = None, {}, {}
    mib = lambda value: None if value is None else value / 2**20  # noqa: E731
    for run_dir in map(Path, run_dirs):
        rows, _ = read_metrics(run_dir)
        summary = summarize(rows)
        scores = run_dir / "eval_policy.json"
        policy = json.loads(scores.read_text(encoding="utf-8")) if scores.exists() else None
        if policy is not None and policy.get("baseline_greedy"):
            baseline_gold = policy["baseline_greedy"]["gold_reward"]
        figures[run_dir.name] = {
            "greedy": policy and policy["greedy"]["gold_reward"], "sampled": policy and policy["sampled"]["gold_reward"],
            "win_rate": policy and policy["win_rate"], "kl": policy and policy["kl"],
            "best": summary["best_eval/gold_reward"], "best_step": summary["best_gold_step"],
            "train_s": summary["train_seconds"], "peak": mib(summary["peak_memory_bytes"]),
            "state": mib(summary["optimizer_state_bytes"])}
        configs[run_dir.name] = read_run_config(run_dir)
    groups = seed_groups(configs)
    for label, members in groups.items():
        runs = [figures[run] for run in members]
        best = seeds_cell([run["best"] for run in runs])
        if len(runs) == 1 and runs[0]["best"] is not None:
            best = f"{runs[0]['best']:.3g} ({runs[0]['best_step']})"
        lines.append("| " + " | ".join([label, str(len(runs))] + [seeds_cell([run[key] for run in runs]) for key in (
            "greedy", "sampled", "win_rate", "kl")] + [best] + [seeds_cell([run[key] for run in runs])
                                                               for key in ("train_s", "peak", "state")]) + " |")
    if baseline_gold is not None:
        lines += ["", f"The SFT policy they all start from: greedy gold reward {baseline_gold:.3g}."]
    lines += differences_beyond_seeds({label: [figures[run]["greedy"] for run in members
                                               if figures[run]["greedy"] is not None]
                                       for label, members in groups.items()}, "final greedy gold")
    lines += ["", f"Written by `python -m pipeline.evaluate algorithms`, {provenance()}."]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return text


def differences_beyond_seeds(values: dict, what: str, higher_is_better: bool = True) -> list:
    """Markdown lines: each setting's `what` against the best setting's (highest mean, or lowest), and
    whether the difference exceeds what the seeds alone move (`pipeline.seeds.compare_seeds`)."""
    values = {label: group for label, group in values.items() if group}
    if len(values) < 2:
        return []
    sign = 1 if higher_is_better else -1
    best = max(values, key=lambda label: sign * sum(values[label]) / len(values[label]))
    lines = ["", f"Against the best {what} ({best}), by a two-sample t-test over the seeds (5%):", ""]
    for label, group in values.items():
        if label == best:
            continue
        comparison = compare_seeds(values[best], group)
        if comparison["within_noise"] is None:
            verdict = "one seed on a side: no spread to compare with"
        else:
            verdict = (f"t = {comparison['t']:.2f}, " +
                       ("within the seed spread" if comparison["within_noise"] else "beyond the seed spread"))
        lines.append(f"- {label}: {comparison['difference']:+.3g} ({verdict})")
    return lines


# ---- policy: a policy's responses to held-out prompts, scored ------------------------------------
# torch, transformers and trl are imported inside these functions: importing them takes seconds,
# which `curves` need not pay.

@dataclasses.dataclass
class PolicyEvalConfig:
    """What `python -m pipeline.evaluate policy` scores, and how it generates."""

    policy_path: Optional[str] = None           # Hugging Face directory; its tokenizer serves every model
    reward_model_path: Optional[str] = None     # a RewardModel directory (the export of stages.reward)
    baseline_policy_path: Optional[str] = None  # e.g. the SFT model: its greedy responses give the win rate
    ref_model_path: Optional[str] = None        # the KL is against it; defaults to the baseline; neither: no KL
    prompts_path: Optional[str] = None          # held-out rows {"prompt": ...}, read as `data.format: prompt`
    output: Optional[str] = None                # the JSON file written
    max_prompt_length: int = 256                # longer prompts are skipped (and counted)
    max_new_tokens: int = 32
    temperature: float = 1.0                    # sampling only: log-probs are the models' own, as in ReMax
    top_p: float = 1.0
    num_samples: int = 1                        # sampled responses per prompt
    batch_size: int = 8                         # prompts per generate call
    seed: int = 0                               # seeds the sampling: the same config gives the same numbers
    gold_reward: Optional[str] = None           # a programmatic true reward to report too: "demo", "compare"
    # As in ReMax: subtracted from the reward of responses cut by max_new_tokens before their eos,
    # so the scores compare with a run's eval/reward.
    missing_eos_penalty: Optional[float] = None
    device: str = "auto"                        # auto (cuda where available, else cpu) | cpu | cuda
    precision: str = "fp32"                     # fp32 | bf16
    logits_chunk: int = LOGITS_CHUNK            # tokens of logits at once in the KL's log-probs; 0: all at once
    engine: str = "hf"                          # generates the responses: hf (`generate`) | vllm (one engine)
    kv_cache_gib: Optional[float] = None        # vllm: the KV cache's size; null: 1 on CPU, 0.3 of the GPU

    @property
    def reference_path(self) -> Optional[str]:
        return self.ref_model_path or self.baseline_policy_path

    def problems(self) -> list:
        """Every problem at once, each naming the field, the value and the fix; paths are checked too,
        so a typo fails before minutes of loading."""
        from pipeline.gold_rewards import GOLD_REWARDS

        problems = []
        for field, what in (("policy_path", "a Hugging Face policy directory"),
                            ("reward_model_path", "a reward model directory (the export of stages.reward)"),
                            ("prompts_path", 'a JSON / JSONL file of {"prompt": ...} rows'),
                            ("output", "the JSON file to write, e.g. runs/eval_policy.json")):
            if getattr(self, field) is None:
                problems.append(f"`{field}` is not set; give {what}")
        for field in ("max_prompt_length", "max_new_tokens", "num_samples", "batch_size"):
            if getattr(self, field) <= 0:
                problems.append(f"`{field}` is {getattr(self, field)}; it must be a positive integer")
        if problem := chunk_problem("logits_chunk", self.logits_chunk):
            problems.append(problem)
        if self.temperature <= 0:
            problems.append(f"`temperature` is {self.temperature}; it must be positive")
        if not 0 < self.top_p <= 1:
            problems.append(f"`top_p` is {self.top_p}; use a value in (0, 1]")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            problems.append(f"`missing_eos_penalty` is {self.missing_eos_penalty}; it must not be negative")
        if self.gold_reward is not None and self.gold_reward not in GOLD_REWARDS:
            problems.append(f"`gold_reward` is {self.gold_reward!r}; use one of {', '.join(GOLD_REWARDS)} "
                            "or leave it unset")
        if self.engine == "vllm":
            import importlib.util

            from pipeline.rl.sections import VLLM_INSTALL

            if importlib.util.find_spec("vllm") is None:
                problems.append(f"`engine` is vllm but vLLM is not installed; {VLLM_INSTALL}")
        for field, choices in (("device", ("auto", "cpu", "cuda")), ("precision", ("fp32", "bf16")),
                               ("engine", ("hf", "vllm"))):
            if getattr(self, field) not in choices:
                problems.append(f"`{field}` is {getattr(self, field)!r}; use one of {', '.join(choices)}")
        return problems + self.path_problems()

    def path_problems(self) -> list:
        """Paths that are set but hold nothing usable."""
        from pipeline.models import ModelLoadError, check_model_dir

        problems = []
        for field in ("policy_path", "baseline_policy_path", "ref_model_path", "reward_model_path"):
            if getattr(self, field) is not None:
                try:
                    check_model_dir(getattr(self, field), field)
                except ModelLoadError as error:
                    problems.append(str(error))
        if self.prompts_path is not None and not Path(self.prompts_path).exists():
            problems.append(f"`prompts_path` {self.prompts_path} does not exist")
        return problems


@dataclasses.dataclass
class PolicyModels:
    policy: object
    reward: object                # RewardModel
    baseline: Optional[object]    # None without `baseline_policy_path`
    reference: Optional[object]   # None without `ref_model_path` and `baseline_policy_path`
    tokenizer: object
    device: object                # torch.device


def load_policy_models(config: PolicyEvalConfig) -> PolicyModels:
    """Policy, reward model, baseline and reference in eval mode on one device; a directory named by
    two fields is loaded once.

    Raises:
        ModelLoadError: naming the field whose directory cannot be loaded, or whose vocabulary
            differs from the policy's (every model reads the policy's tokens).
    """
    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import ModelLoadError, RewardModel, load_causal_lm, load_tokenizer

    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    loaded = {}

    def causal_lm(field: str):
        path = getattr(config, field)
        if path is None:
            return None
        if Path(path).resolve() not in loaded:
            model = load_causal_lm(ModelConfig(path=path), dtype=dtype, device=str(device), field=field)
            loaded[Path(path).resolve()] = model.eval()
        return loaded[Path(path).resolve()]

    tokenizer = load_tokenizer(ModelConfig(path=config.policy_path), field="policy_path")
    reference_field = "ref_model_path" if config.ref_model_path is not None else "baseline_policy_path"
    models = PolicyModels(policy=causal_lm("policy_path"),
                          reward=RewardModel.from_pretrained(config.reward_model_path, dtype=dtype, device=str(device),
                                                             field="reward_model_path").eval(),
                          baseline=causal_lm("baseline_policy_path"), reference=causal_lm(reference_field),
                          tokenizer=tokenizer, device=device)
    vocab_size = models.policy.config.vocab_size
    for field, model in (("reward_model_path", models.reward), ("baseline_policy_path", models.baseline),
                         (reference_field, models.reference)):
        if model is not None and model.config.vocab_size != vocab_size:
            raise ModelLoadError(f"`{field}` {getattr(config, field)} has a vocabulary of {model.config.vocab_size} "
                                 f"tokens and `policy_path` one of {vocab_size}; every model reads the policy's "
                                 "tokens, so give models that share its tokenizer")
    return models


def extend(total: dict, part: dict) -> dict:
    """Appends the lists of `part` to those of `total`, key by key, through nested dicts."""
    for name, value in part.items():
        if isinstance(value, dict):
            extend(total.setdefault(name, {}), value)
        else:
            total.setdefault(name, []).extend(value)
    return total


def response_values(responses, prompts: list, tokenizer, gold_reward) -> dict:
    """Per response of a `Responses` batch, as lists: the reward model's score, the length in tokens (eos
    included), 1 where the length limit cut it before its eos, and the gold reward of its text."""
    from pipeline.generation import missing_eos

    cut = missing_eos(responses.sequences[:, -responses.mask.shape[1]:], responses.mask, tokenizer.eos_token_id)
    values = {"reward": responses.reward.tolist(), "response_length": responses.lengths.tolist(),
              "missing_eos": cut.long().tolist()}
    if gold_reward is not None:
        values["gold_reward"] = list(gold_reward(prompts, responses.texts(tokenizer)))
    return values


def score_batch(models: PolicyModels, batch: dict, generation: tuple, config: PolicyEvalConfig,
                gold_reward, generated: Optional[dict] = None) -> dict:
    """The policy's greedy and `num_samples` sampled responses to one prompt batch, and the baseline's
    greedy ones, scored: `response_values` under "greedy", "sampled" and "baseline_greedy", and
    under "kl" each sample's summed log pi - log pi_ref (the sample estimate of KL(pi || pi_ref), as
    ReMax logs it). `generated`: the responses already generated by another engine (vLLM), under
    ("greedy",), ("baseline_greedy",) and ("sampled", i); else `generate` makes them here."""
    from pipeline.generation import generate_responses, response_logprobs, scored
    from pipeline.rl.algos import sequence_log_ratio

    sample_config, greedy_config = generation
    tokenizer, prompts = models.tokenizer, batch["prompt"]

    def respond(model, generation_config, name: tuple):
        if generated is not None:
            responses = generated[name]
            responses = (responses.sequences, responses.attention_mask, responses.mask)
        else:
            responses = generate_responses(model, batch, generation_config, tokenizer)
        return scored(models.reward, *responses, tokenizer.eos_token_id, config.missing_eos_penalty)

    values = {"greedy": response_values(respond(models.policy, greedy_config, ("greedy",)), prompts, tokenizer,
                                        gold_reward),
              "sampled": {}, "kl": []}
    if models.baseline is not None:
        values["baseline_greedy"] = response_values(respond(models.baseline, greedy_config, ("baseline_greedy",)),
                                                    prompts, tokenizer, gold_reward)
    for index in range(config.num_samples):
        sampled = respond(models.policy, sample_config, ("sampled", index))
        extend(values["sampled"], response_values(sampled, prompts, tokenizer, gold_reward))
        if models.reference is not None:
            length = sampled.mask.shape[1]
            logprobs, _ = response_logprobs(models.policy, sampled.sequences, sampled.attention_mask, length,
                                            chunk=config.logits_chunk)
            ref_logprobs, _ = response_logprobs(models.reference, sampled.sequences, sampled.attention_mask, length,
                                                chunk=config.logits_chunk)
            values["kl"] += sequence_log_ratio(logprobs, ref_logprobs, sampled.mask).tolist()
    return values


def mean_std(values: list) -> tuple:
    """(mean, population standard deviation) of a non-empty list."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))


def win_rate(rewards: list, baseline_rewards: list) -> float:
    """Fraction of prompts whose reward beats the baseline's, ties counting half."""
    wins = [1.0 if ours > theirs else 0.5 if ours == theirs else 0.0 for ours, theirs in zip(rewards, baseline_rewards)]
    return sum(wins) / len(wins)


def response_summary(values: dict) -> dict:
    """Means (and the reward's std) of `response_values` lists; gold_reward None without one."""
    reward_mean, reward_std = mean_std(values["reward"])
    return {"reward_mean": reward_mean, "reward_std": reward_std,
            "response_length": mean_std(values["response_length"])[0],
            "missing_eos_fraction": mean_std(values["missing_eos"])[0],
            "gold_reward": mean_std(values["gold_reward"])[0] if "gold_reward" in values else None}


def policy_result(values: dict, config: PolicyEvalConfig, prompt_count: int) -> dict:
    """The JSON written: summaries per kind of response, win rate and KL (None where not measured), and the
    config with the reference resolved."""
    baseline = values.get("baseline_greedy")
    return {"prompts": prompt_count, "samples_per_prompt": config.num_samples,
            "greedy": response_summary(values["greedy"]), "sampled": response_summary(values["sampled"]),
            "baseline_greedy": response_summary(baseline) if baseline else None,
            "win_rate": win_rate(values["greedy"]["reward"], baseline["reward"]) if baseline else None,
            "kl": mean_std(values["kl"])[0] if values["kl"] else None,
            "config": {**dataclasses.asdict(config), "ref_model_path": config.reference_path}}


def evaluate_policy(config: PolicyEvalConfig) -> dict:
    """Scores the policy on every usable prompt of `prompts_path`; writes `output` (JSON) and returns it.

    Raises:
        ModelLoadError: a model directory that cannot be loaded, naming the field.
        DataError: an unreadable prompts file, or one without a usable prompt.
    """
    import torch

    from pipeline.config import DataConfig
    from pipeline.data import prepare_file
    from pipeline.generation import collate_with_prompts, generation_configs, load_gold_reward

    models = load_policy_models(config)
    tokenizer = models.tokenizer
    data = DataConfig(path=config.prompts_path, format="prompt", max_prompt_length=config.max_prompt_length,
                      max_length=config.max_prompt_length + config.max_new_tokens)
    prompts, report = prepare_file(data, tokenizer)
    logger.info(report.summary())
    generation = generation_configs(tokenizer, config.max_new_tokens, config.temperature, config.top_p)
    gold_reward = load_gold_reward(config.gold_reward)
    torch.manual_seed(config.seed)
    batches = []
    for start in range(0, len(prompts), config.batch_size):
        rows = [prompts[index] for index in range(start, min(start + config.batch_size, len(prompts)))]
        batch = collate_with_prompts(rows, tokenizer.pad_token_id)
        batches.append({name: value.to(models.device) if torch.is_tensor(value) else value
                        for name, value in batch.items()})
    generated = vllm_responses(config, tokenizer, batches) if config.engine == "vllm" else [None] * len(batches)
    values = {}
    with torch.no_grad():
        for batch, responses in zip(batches, generated):
            extend(values, score_batch(models, batch, generation, config, gold_reward, responses))
    result = policy_result(values, config, len(prompts))
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def vllm_responses(config: PolicyEvalConfig, tokenizer, batches: list) -> list:
    """Per prompt batch, {("greedy",), ("sampled", i), ("baseline_greedy",): Generated} from one vLLM
    engine: every batch on the policy's weights, then on the baseline's (read into the same engine)."""
    import torch

    from pipeline.rl.rollout import Sampling
    from pipeline.rl.sections import RolloutSection
    from pipeline.rl.vllm_engine import create_llm, generate

    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    llm = create_llm(config.policy_path, RolloutSection(engine="vllm", kv_cache_gib=config.kv_cache_gib), dtype,
                     config.max_prompt_length + config.max_new_tokens, config.seed)
    sampling = Sampling(config.max_new_tokens, config.temperature, config.top_p)
    samplings = [sampling.as_greedy()] + [sampling] * config.num_samples
    names = [("greedy",)] + [("sampled", index) for index in range(config.num_samples)]
    responses = [dict(zip(names, generate(llm, tokenizer, batch, samplings, config.seed, ("policy", index))))
                 for index, batch in enumerate(batches)]
    if config.baseline_policy_path is not None:
        llm.collective_rpc("reload_weights", kwargs={"weights_path": config.baseline_policy_path})
        for index, batch in enumerate(batches):
            [responses[index][("baseline_greedy",)]] = generate(llm, tokenizer, batch, [sampling.as_greedy()],
                                                                 config.seed, ("baseline", index))
        # The engine is kept for reuse under the policy's path: it goes back to holding the policy.
        llm.collective_rpc("reload_weights", kwargs={"weights_path": config.policy_path})
    return responses


def policy_table(result: dict) -> str:
    config = result["config"]
    columns = ("reward_mean", "reward_std", "response_length", "missing_eos_fraction", "gold_reward")
    lines = [f"{config['policy_path']} on {result['prompts']} prompts of {config['prompts_path']}, "
             f"{result['samples_per_prompt']} sample(s) each", "",
             "| responses | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in ("greedy", "sampled", "baseline_greedy"):
        if result[name] is not None:
            lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(_cell(result[name][c]) for c in columns) + " |")
    lines += ["", f"win rate vs {config['baseline_policy_path'] or 'a baseline'} (greedy, ties half): "
                  f"{_cell(result['win_rate'])}",
              f"KL to {config['ref_model_path'] or 'a reference'} (sampled, summed over tokens): {_cell(result['kl'])}",
              f"written to {config['output']}"]
    return "\n".join(lines)


def run_policy(config_path: str, overrides: list, debug: bool = False) -> int:
    """`policy`: loads the config, scores, prints the table. Returns the exit code: 0, or
    EXIT_USER_ERROR after a one-paragraph message for bad input (the traceback only with `debug`)."""
    from pipeline.data import DataError
    from pipeline.models import ModelLoadError
    from pipeline.run import EXIT_USER_ERROR

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = evaluate_policy(load_config(PolicyEvalConfig, config_path, overrides))
    except (ConfigError, ModelLoadError, DataError, FileNotFoundError) as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(policy_table(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    curve_parser = commands.add_parser("curves", help="plot and summarise runs")
    curve_parser.add_argument("runs", nargs="+", help="run directories (each holding metrics.jsonl)")
    curve_parser.add_argument("--out", required=True, help="directory for the PNGs and summary.md")
    curve_parser.add_argument("--smoothing", type=float, default=0.6, help="EMA weight in [0, 1) of per-step metrics")
    curve_parser.add_argument("--kl-budget", type=float, default=None,
                              help="flag runs whose held-out KL passes it (default: each run's evaluate.kl_budget)")
    policy_parser = commands.add_parser("policy", help="score a policy's responses to prompts with a reward model")
    policy_parser.add_argument("--config", required=True, help="YAML scorer config (fields of PolicyEvalConfig)")
    policy_parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    policy_parser.add_argument("overrides", nargs="*", help="key=value settings applied after the file")
    table_parser = commands.add_parser("algorithms", help="one table row per policy-optimisation run")
    table_parser.add_argument("runs", nargs="+", help="run directories (metrics.jsonl, optionally eval_policy.json)")
    table_parser.add_argument("--out", required=True, help="the Markdown file to write")
    args = parser.parse_args(argv)
    if args.command == "algorithms":
        try:
            print(algorithm_table(args.runs, Path(args.out)), end="")
        except EvaluateError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command == "policy":
        return run_policy(args.config, args.overrides, args.debug)
    if not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing is {args.smoothing}; use a value in [0, 1)")
    try:
        result = curves(args.runs, args.out, args.smoothing, args.kl_budget)
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
