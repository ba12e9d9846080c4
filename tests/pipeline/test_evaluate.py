"""Curves and summaries from synthetic metrics files: values, PNGs, and partial or missing runs."""
import json
import math

import pytest

from pipeline.evaluate import EvaluateError, algorithm_table, area_under, curves, main, smooth, wall_clock_series
from pipeline.provenance import provenance


def write_run(directory, rows, extra_lines=()):
    directory.mkdir(parents=True)
    lines = [json.dumps(row) for row in rows] + list(extra_lines)
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def remax_rows(rewards, kls):
    rows = [{"step": step * 10, "eval/reward": reward, "eval/kl": kl} for step, (reward, kl) in enumerate(zip(rewards, kls))]
    rows += [{"step": step, "reward": 0.1 * step, "step_time": 0.5, "optimizer_step_time": 0.125,
              "peak_memory_bytes": 1000 + step}
             for step in range(1, 11)]
    return rows


def test_summary_values_and_pngs(tmp_path):
    run = write_run(tmp_path / "adam_mini", remax_rows([0.0, 2.0, 1.0], [0.0, 0.5, 0.9]))
    result = curves([run], tmp_path / "out")
    summary = result["summaries"]["adam_mini"]
    assert summary["first_eval_reward"] == 0.0 and summary["final_eval_reward"] == 1.0
    assert (summary["best_eval_reward"], summary["best_step"], summary["kl_at_best"]) == (2.0, 10, 0.5)
    assert summary["eval_reward_auc"] == pytest.approx(10 * (0 + 2) / 2 + 10 * (2 + 1) / 2)
    assert summary["train_seconds"] == pytest.approx(5.0) and summary["peak_memory_bytes"] == 1010
    assert summary["optimizer_seconds"] == pytest.approx(1.25)
    names = {path.name for path in result["plots"]}
    assert {"eval_reward.png", "eval_kl.png", "reward.png"} <= names
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in result["plots"])
    assert "| adam_mini | 0 | 1 | 2 | 10 | 0.5 |" in result["summary"].read_text()
    assert "| 20 | 5 | 1.25 | 1010 |" in result["summary"].read_text()  # last step, train and optimizer seconds, peak


def test_runs_of_different_lengths_and_missing_metrics_are_reported(tmp_path):
    long_run = write_run(tmp_path / "long", remax_rows([0.0, 1.0, 2.0], [0.0, 0.1, 0.2]))
    short_run = write_run(tmp_path / "short", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
                          extra_lines=['{"step": 3, "loss": 1.'])  # cut off mid-write
    missing = tmp_path / "never_ran"
    result = curves([long_run, short_run, missing], tmp_path / "out")
    problems = "\n".join(result["problems"])
    assert "never_ran/metrics.jsonl: no metrics file" in problems
    assert "short/metrics.jsonl: line 3 is not JSON" in problems
    assert "long, short end at different steps (2, 20)" in problems
    assert "`eval/reward` is missing from short" in problems
    assert result["summaries"]["short"]["final_eval_reward"] is None
    assert "## Problems" in result["summary"].read_text()


def test_runs_of_different_stages_are_not_reported_as_problems(tmp_path):
    """The demo's SFT and ReMax runs log different metrics for different numbers of steps by design."""
    sft = write_run(tmp_path / "sft", [{"step": 0, "eval/loss": 4.0}] + [{"step": s, "loss": 1.0} for s in (1, 2, 3)])
    remax = write_run(tmp_path / "remax", remax_rows([0.0, 1.0], [0.0, 0.1]))
    remax_again = write_run(tmp_path / "remax_again", [row for row in remax_rows([0.0, 1.0], [0.0, 0.1])
                                                              if row["step"] <= 9])
    problems = curves([sft, remax, remax_again], tmp_path / "out")["problems"]
    assert problems == ["remax, remax_again end at different steps (9, 10); curves are overlaid as logged"]


def test_no_readable_run_is_an_error_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(EvaluateError, match="no run could be read"):
        curves([tmp_path / "nothing"], tmp_path / "out")
    assert main(["curves", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "no metrics file" in capsys.readouterr().err


def test_smoothing_and_area():
    assert smooth([1.0, 1.0, 1.0], 0.6) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no drag to 0
    assert smooth([0.0, 10.0], 0.5) == pytest.approx([0.0, (0.5 * 10) / (1 - 0.25)])
    assert area_under([0, 2], [1.0, 3.0]) == 4.0 and math.isnan(area_under([1], [1.0]))


def test_curves_against_training_time_sum_the_step_times_up_to_each_point():
    rows = [{"step": 0, "eval/gold_reward": 0.1}, {"step": 1, "step_time": 0.5}, {"step": 2, "step_time": 1.5},
            {"step": 2, "eval/gold_reward": 0.4}, {"step": 3, "step_time": 1.0}, {"step": 4, "step_time": 2.0},
            {"step": 4, "eval/gold_reward": 0.3}]
    assert wall_clock_series(rows, "eval/gold_reward") == ([0.0, 2.0, 5.0], [0.1, 0.4, 0.3])


def test_algorithm_table_rows_from_metrics_and_policy_scores(tmp_path):
    rows = remax_rows([0.0, 2.0, 1.0], [0.0, 0.5, 0.9])
    rows += [{"step": 0, "eval/gold_reward": 0.05}, {"step": 10, "eval/gold_reward": 0.6},
             {"step": 20, "eval/gold_reward": 0.5}, {"step": 10, "optimizer_state_bytes": 3 * 2**20}]
    grpo = write_run(tmp_path / "grpo", rows)
    score = lambda gold: {"reward_mean": 1.0, "gold_reward": gold}  # noqa: E731
    (grpo / "eval_policy.json").write_text(json.dumps({"greedy": score(0.55), "sampled": score(0.4), "win_rate": 0.9,
                                                       "kl": 2.5, "baseline_greedy": score(0.08)}))
    dpo = write_run(tmp_path / "dpo", [{"step": 1, "loss": 0.6, "step_time": 2.0, "peak_memory_bytes": 2**21}])
    text = algorithm_table([grpo, dpo], tmp_path / "report" / "algorithms.md")
    assert "| grpo | 1 | 0.55 | 0.4 | 0.9 | 2.5 | 0.6 (10) | 5 | 0.0009632 | 3 |" in text
    assert "| dpo | 1 | - | - | - | - | - | 2 | 2 | - |" in text  # no policy scores yet, no gold evaluations
    assert "greedy gold reward 0.08" in text
    assert text.rstrip().endswith(f"Written by `python -m pipeline.evaluate algorithms`, {provenance()}.")
    assert (tmp_path / "report" / "algorithms.md").read_text() == text


# ---- curves drawn honestly, seeds together, reward-hacking signals ---------------------------------

def ema(values, weight):
    """TensorBoard's bias-corrected EMA, written out: s_i = (sum_j w^(i-j) (1-w) v_j) / (1 - w^i)."""
    return [sum(weight ** (i - j) * (1 - weight) * values[j] for j in range(i + 1)) / (1 - weight ** (i + 1))
            for i in range(len(values))]


def test_evaluations_are_drawn_as_logged_and_per_step_metrics_raw_and_smoothed():
    from pipeline.evaluate import curve_figure

    gold = [0.08, 0.49, 0.50, 0.50, 0.50, 0.52, 0.55]  # a demo run's held-out gold: an EMA would end below all
    steps = [10 * i for i in range(7)]
    figure = curve_figure({"remax": [(steps, steps, gold)]}, "eval/gold_reward", "step", smoothing=0.6)
    [line] = figure.axes[0].lines
    assert list(line.get_ydata()) == gold and line.get_marker() == "o"
    assert figure.axes[0].get_legend().get_texts()[0].get_text() == "remax"

    reward = [0.0, 1.0, 0.0, 1.0, 0.5]
    figure = curve_figure({"remax": [(range(5), range(5), reward)]}, "reward", "step", smoothing=0.6)
    raw, smoothed = figure.axes[0].lines
    assert list(raw.get_ydata()) == reward and raw.get_alpha() == 0.3
    assert list(smoothed.get_ydata()) == pytest.approx(ema(reward, 0.6), rel=1e-12)
    assert "EMA 0.6" in figure.axes[0].get_legend().get_texts()[0].get_text()


def test_a_seed_group_is_drawn_as_its_mean_with_the_min_max_band():
    from pipeline.evaluate import curve_figure

    seeds = [[0.1, 0.5, 0.6], [0.1, 0.3, 0.7], [0.1, 0.4]]  # the third seed was cut off after step 10
    curves = {"grpo": [([0, 10, 20][:len(values)], [0, 10, 20][:len(values)], values) for values in seeds]}
    axes = curve_figure(curves, "eval/gold_reward", "step", smoothing=0.6).axes[0]
    [line] = axes.lines
    assert list(line.get_xdata()) == [0, 10] and list(line.get_ydata()) == pytest.approx([0.1, 0.4])
    band = axes.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(0.1) and band[:, 1].max() == pytest.approx(0.5)
    assert axes.get_legend().get_texts()[0].get_text() == "grpo: mean of 3 seeds, min-max band"


def write_seeded_run(root, name, seed, rows, lr=1e-3):
    import yaml

    run = write_run(root / name, rows)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "output_dir": str(run), "optim": {"lr": lr}}))
    return run


def test_the_summary_gives_each_seed_group_its_mean_and_std(tmp_path):
    import statistics

    finals = [0.5, 0.6, 0.55]
    runs = [write_seeded_run(tmp_path, f"remax-seed{seed}", seed, remax_rows([0.0, 1.0, final], [0.0, 0.1, 0.2]))
            for seed, final in enumerate(finals)]
    runs.append(write_seeded_run(tmp_path, "remax-lr3e-3", 0, remax_rows([0.0, 1.0, 0.9], [0.0, 0.1, 0.2]), lr=3e-3))
    result = curves(runs, tmp_path / "out")
    assert result["groups"] == {"remax": ["remax-seed0", "remax-seed1", "remax-seed2"], "remax-lr3e-3": ["remax-lr3e-3"]}
    text = result["summary"].read_text()
    mean, std = statistics.mean(finals), statistics.stdev(finals)
    row = next(line for line in text.splitlines() if line.startswith("| remax | 3 |"))
    assert f"| {mean:.4g} ± {std:.2g} |" in row  # final_eval_reward, the second column after the seeds
    assert row.split(" | ")[3] == f"{mean:.4g} ± {std:.2g}"


def remax_signal_rows(scores, golds, rewards, lengths, entropies, kls):
    rows = [{"step": 10 * i, "eval/reward": score, "eval/gold_reward": gold, "eval/kl": kl}
            for i, (score, gold, kl) in enumerate(zip(scores, golds, kls))]
    rows += [{"step": i + 1, "reward": reward, "response_length": length, "entropy": entropy}
             for i, (reward, length, entropy) in enumerate(zip(rewards, lengths, entropies))]
    return rows


def test_reward_hacking_signals_are_flagged_past_their_thresholds(tmp_path):
    import numpy as np

    from pipeline.evaluate import hacking_signals

    # The score keeps rising while the gold reward peaks at step 10 and gives back 0.3 of the 0.4 it gained;
    # reward follows length; entropy falls to a tenth; KL passes a budget of 5.
    rewards, lengths = [1.0, 2.0, 2.5, 3.5, 4.0, 5.0], [10, 14, 15, 22, 24, 30]
    hacked = remax_signal_rows([0.0, 3.0, 6.0], [0.1, 0.5, 0.2], rewards, lengths,
                               [3.0, 3.0, 3.0, 0.5, 0.3, 0.1], [0.0, 2.0, 7.5])
    found = hacking_signals(hacked, kl_budget=5.0)
    assert all(found[name]["flagged"] for name in ("score_up_gold_down", "length", "kl", "entropy")), found
    assert found["length"]["value"] == f"{np.corrcoef(rewards, lengths)[0, 1]:.2f}"
    assert found["entropy"]["value"] == f"{0.3 / 3.0:.2f}" and found["kl"]["value"] == "7.5 / 7.5 (5)"
    assert found["score_up_gold_down"]["value"] == "score 3 -> 6, gold 0.5 -> 0.2 (steps 10-20)"

    # Gold still rising at the end, length uncorrelated, entropy kept, KL within the budget: nothing flagged.
    healthy = remax_signal_rows([0.0, 3.0, 6.0], [0.1, 0.5, 0.6], rewards, [20, 12, 25, 11, 22, 13],
                                [3.0, 2.9, 2.8, 2.7, 2.6, 2.5], [0.0, 2.0, 3.0])
    found = hacking_signals(healthy, kl_budget=5.0)
    assert not any(signal["flagged"] for signal in found.values()), found
    # A small dip after the gold's best (0.02 of the 0.4 gained) is not over-optimisation.
    dip = remax_signal_rows([0.0, 3.0, 6.0], [0.1, 0.5, 0.48], rewards, lengths, [3.0] * 6, [0.0, 1.0, 2.0])
    assert not hacking_signals(dip)["score_up_gold_down"]["flagged"]
    assert hacking_signals([{"step": 1, "loss": 0.5}]) is None  # SFT: no signals

    import yaml
    run = write_run(tmp_path / "remax", hacked)
    (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "output_dir": str(run), "evaluate": {"kl_budget": 10}}))
    text = curves([run], tmp_path / "out")["summary"].read_text()
    assert "## Reward-hacking signals" in text and "| **FLAG** score 3 -> 6" in text
    assert "| 7.5 / 7.5 (10) |" in text  # the run's own budget: not passed
    assert "**FLAG** 7.5" in curves([run], tmp_path / "out2", kl_budget=5.0)["summary"].read_text()


def test_algorithm_table_puts_seeds_together_and_says_which_differences_exceed_their_spread(tmp_path):
    import statistics

    import yaml

    golds = {"remax": [0.50, 0.52, 0.54], "grpo": [0.53, 0.55, 0.57], "rloo": [0.70, 0.72, 0.74]}
    runs = []
    for algorithm, values in golds.items():
        for seed, gold in enumerate(values):
            run = write_run(tmp_path / f"{algorithm}-seed{seed}", [{"step": 1, "loss": 0.1, "step_time": 1.0}])
            (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "output_dir": str(run), "algo": algorithm}))
            (run / "eval_policy.json").write_text(json.dumps({"greedy": {"gold_reward": gold},
                                                              "sampled": {"gold_reward": gold / 2}, "win_rate": 1.0,
                                                              "kl": 2.0}))
            runs.append(run)
    text = algorithm_table(runs, tmp_path / "algorithms.md")
    mean, std = statistics.mean(golds["remax"]), statistics.stdev(golds["remax"])
    assert f"| remax | 3 | {mean:.4g} ± {std:.2g} |" in text
    # rloo is best; t-tests (pooled std 0.02, 3 seeds each): remax -0.2 (t = -12.2), grpo -0.17 (t = -10.4).
    assert "Against the best final greedy gold (rloo)" in text
    assert "- remax: -0.2 (t = -12.25, beyond the seed spread)" in text
    assert "- grpo: -0.17 (t = -10.41, beyond the seed spread)" in text


def test_the_summary_says_whether_seed_groups_differ_beyond_their_spread(tmp_path):
    """SFT under two optimizers, 3 seeds each: held-out losses 1.00/1.02/1.04 against 1.01/1.03/1.05
    (t = -0.61: within the spread) and against 1.50/1.52/1.54 (beyond it); lower is better."""
    runs = []
    for name, losses in (("adamw", [1.00, 1.02, 1.04]), ("adam_mini", [1.01, 1.03, 1.05]), ("sgd", [1.5, 1.52, 1.54])):
        for seed, loss in enumerate(losses):
            runs.append(write_seeded_run(tmp_path, f"{name}-seed{seed}", seed, [{"step": 0, "eval/loss": 4.0},
                                                                                 {"step": 5, "eval/loss": loss}],
                                         lr={"adamw": 1e-3, "adam_mini": 2e-3, "sgd": 3e-3}[name]))
    text = curves(runs, tmp_path / "out")["summary"].read_text()
    assert "Against the best `final_eval/loss` (adamw)" in text
    assert "- adam_mini: +0.01 (t = 0.61, within the seed spread)" in text
    assert "- sgd: +0.5 (t = 30.62, beyond the seed spread)" in text
