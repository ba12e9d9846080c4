"""benchmarks/data_prepare run as the README runs it, on 2 ranks and a few generated rows: each of its three runs
(every rank tokenising, cache cold, cache warm) leaves every rank holding every generated row, the cache is
tokenised by 2, 1 and 0 ranks, and the figures printed are those written."""
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, rank_env

ROWS, RANKS = 8, 2


@pytest.mark.slow
def test_every_rank_holds_every_generated_row_and_the_cache_is_tokenised_once_then_reused(tmp_path):
    out = tmp_path / "prepare.json"
    # One layout, the one with a chat template and nested rows; 2 ranks, the fewest that share a cache.
    run = subprocess.run([sys.executable, "-m", "benchmarks.data_prepare", "--rows", str(ROWS), "--ranks", str(RANKS),
                          "--layouts", "ultrachat", "--json", str(out)], cwd=REPO_ROOT, env=rank_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    [row] = json.loads(out.read_text())
    assert (row["layout"], row["ranks"], row["rows"]) == ("ultrachat", RANKS, ROWS)
    # Train plus eval split on each rank of each run: nothing dropped, nothing lost through the cache.
    assert row["rank_rows"] == [[ROWS] * RANKS] * 3
    assert row["tokenised_by"] == [RANKS, 1, 0]  # cache off: all; cold: one, the other loads; warm: none
    seconds = [row["every_rank_s"], row["cache_cold_s"], row["cache_warm_s"]]
    assert all(math.isfinite(s) and s > 0 for s in seconds), seconds
    every, cold, warm = seconds
    printed = next(line.split() for line in run.stdout.splitlines() if line.startswith("ultrachat "))
    assert printed[:7] == ["ultrachat", str(RANKS), f"{every:.2f}", f"{cold:.2f}", f"{cold / every:.2f}",
                           f"{warm:.2f}", f"{warm / every:.2f}"]
