"""benchmarks/compare_rewards: its arithmetic on hand-made runs (a run's scores from its metrics and its
policy evaluation, mean ± sample std per arm, the t-test between the arms, the table and the figure)."""
import pytest

from benchmarks.compare_rewards import arm_rows, figure, run_scores, table

POLICY = {"greedy": {"gold_reward": 0.5, "reward_mean": 6.0, "missing_eos_fraction": 0.25}, "sampled": {"gold_reward": 0.4},
          "kl": 2.5,
          "baseline_greedy": {"gold_reward": 0.08, "reward_mean": -3.7}}


def run(arm, seed, greedy_gold, reward_model, curve=None):
    return {"arm": arm, "seed": seed, "gold_curve": curve or {0: 0.08, 10: greedy_gold}, "greedy_gold": greedy_gold,
            "sampled_gold": greedy_gold - 0.1, "greedy_reward_model": reward_model, "kl": 2.0, "best_gold": greedy_gold,
            "greedy_cut": 0.5 if "no missing-eos" in arm else 0.0, "sft_gold": 0.08, "sft_reward_model": -3.7}


def test_a_run_is_scored_by_its_last_evaluation_and_its_policy_evaluation():
    rows = [{"step": 0, "eval/gold_reward": 0.08}, {"step": 1, "reward": 1.0},
            {"step": 20, "eval/gold_reward": 0.61}, {"step": 10, "eval/gold_reward": 0.64}]
    scores = run_scores(rows, POLICY)
    assert scores["gold_curve"] == {0: 0.08, 20: 0.61, 10: 0.64}
    assert (scores["final_gold"], scores["best_gold"]) == (0.61, 0.64)
    assert (scores["greedy_gold"], scores["greedy_reward_model"], scores["sft_reward_model"]) == (0.5, 6.0, -3.7)
    assert scores["greedy_cut"] == 0.25
    with pytest.raises(ValueError, match="no eval/gold_reward"):
        run_scores(rows[1:2], POLICY)


def test_arms_are_mean_and_sample_std_over_seeds_and_compared_with_the_gold_arm_by_a_t_test(tmp_path):
    runs = [run("reward model", 0, 0.50, 7.0), run("reward model", 1, 0.52, 7.2), run("reward model", 2, 0.54, 7.4),
            run("reward model, no missing-eos penalty", 0, 0.71, 9.0),
            run("reward model, no missing-eos penalty", 1, 0.73, 9.0),
            run("gold (demo_gold)", 0, 0.70, 5.0), run("gold (demo_gold)", 1, 0.72, 5.2),
            run("gold (demo_gold)", 2, 0.74, 5.4), {"arm": "gold (demo_gold)", "seed": 3, "failed": "exit code 1"}]
    rows = arm_rows(runs)
    assert [row["seeds"] for row in rows] == [[0, 1, 2], [0, 1], [0, 1, 2]]  # the failed run left out
    assert rows[0]["greedy_gold"] == pytest.approx((0.52, 0.02)) and rows[2]["greedy_gold"] == pytest.approx((0.72, 0.02))
    assert rows[2]["greedy_reward_model"] == pytest.approx((5.2, 0.2)) and rows[1]["greedy_cut"] == (0.5, 0.0)
    # Difference -0.2, pooled std 0.02, standard error 0.02 * sqrt(2 / 3): t = -12.247 on 4 df.
    assert rows[0]["vs_gold"]["t"] == pytest.approx(-12.2474, rel=1e-4) and not rows[0]["vs_gold"]["within_noise"]
    # 0.72 against 0.72: no difference; pooled std sqrt((2 x 0.02^2 + 0.0141^2) / 3) on 3 df.
    assert rows[1]["vs_gold"]["difference"] == pytest.approx(0.0, abs=1e-12) and rows[1]["vs_gold"]["within_noise"]
    assert "vs_gold" not in rows[2]
    text = table(rows, runs)
    assert "| (SFT policy, the start) | | 0.080 | | -3.70 | | | |" in text
    assert ("| gold (demo_gold) | 0,1,2 | 0.720 ± 0.020 | 0.620 ± 0.020 | 5.20 ± 0.20 | 0.00 ± 0.00 | 2.00 ± 0.00 | "
            "0.720 ± 0.020 |") in text
    assert "Greedy gold, reward model minus gold: -0.200 (t -12.25, 4 df: beyond seed noise at 5%)." in text
    figure(runs, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 0
