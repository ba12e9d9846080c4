"""compare_algorithms.sh end to end at the smallest size: two seeds of ReMax on the comparison task, 2 steps
each, so the README's algorithm table keeps a script that runs."""
import subprocess

import pytest

from tests.conftest import REPO_ROOT, rank_env

pytestmark = pytest.mark.slow


def test_two_seeds_make_one_row_with_curves_seed_groups_and_signals(tmp_path):
    root = tmp_path / "algorithms"
    env = rank_env()
    env.pop("OMP_NUM_THREADS")  # the launcher splits the cores itself
    env["ALGORITHMS"] = "remax"
    result = subprocess.run(["bash", "training_scripts/compare_algorithms.sh", "--seeds", "2", str(root),
                             "training.max_steps=2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    table = (root / "report" / "algorithms.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| remax |")}
    assert list(rows) == ["remax"] and rows["remax"][1] == "2"  # the two seeds are one row
    assert " ± " in rows["remax"][2]  # greedy gold, mean ± std over the seeds
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                          text=True).stdout.strip()
    if head:  # inside a git checkout: the table names the commit it was written on
        assert f"commit {head}" in table.splitlines()[-1]
    summary = (root / "report" / "summary.md").read_text()
    assert "## Seeds together" in summary and "## Reward-hacking signals" in summary
    assert "| remax-seed0 |" in summary and "| remax-seed1 |" in summary
    assert (root / "report" / "eval_gold_reward.png").stat().st_size > 1000
    assert "compared 2 runs (2 seed(s) per algorithm)" in result.stdout
