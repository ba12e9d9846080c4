"""Curves and summaries from synthetic metrics files: values, PNGs, and partial or missing runs."""
import json
import math

import pytest

from pipeline.evaluate import EvaluateError, algorithm_table, area_under, curves, main, smooth, wall_clock_series


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
    assert "| grpo | 0.55 | 0.4 | 0.9 | 2.5 | 0.6 (10) | 5 | 0.0009632 | 3 |" in text
    assert "| dpo | - | - | - | - | - | 2 | 2 | - |" in text  # no policy scores yet, no gold evaluations
    assert "greedy gold reward 0.08" in text
    assert (tmp_path / "report" / "algorithms.md").read_text() == text
