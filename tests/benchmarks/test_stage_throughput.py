"""benchmarks/stage_throughput run as the README runs it, at its smallest: SFT at ZeRO-2, a 1-layer Llama of width
16, 2 steps of which 1 is timed, each optimizer launched once on 2 CPU ranks. Its rows name what was asked for, its
ratios are the quotients of its figures, and AdamW's state is two fp32 moments for rank 0's half of the parameters,
counted here from the model's shapes."""
import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, rank_env

HIDDEN, LAYERS, STEPS, WARMUP, ZERO, WORLD = 16, 1, 2, 1, 2, 2
OPTIMIZERS = ["adamw", "adam_mini", "adam_mini_shared"]
RATIOS = ("step_ms", "optimizer_step_ms", "tokens_per_s", "peak_rss_mib", "state_mib")
MIB = 2**20


def llama_parameters(vocab: int, hidden: int, intermediate: int, layers: int, heads: int = 8, kv_heads: int = 4):
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden  # untied embedding and head, final norm


@pytest.mark.slow
def test_rows_name_each_optimizer_and_stage_and_ratios_are_quotients_of_the_figures(tmp_path):
    from benchmarks.stage_throughput import load_demo_tokenizer

    out = tmp_path / "throughput.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.stage_throughput", "--stages", "sft", "--zero", str(ZERO),
                          "--steps", str(STEPS), "--warmup", str(WARMUP), "--hidden", str(HIDDEN), "--layers",
                          str(LAYERS), "--json", str(out)], cwd=REPO_ROOT, env=rank_env(), capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    result = json.loads(out.read_text())
    parameters = llama_parameters(len(load_demo_tokenizer()), HIDDEN, result["model"]["intermediate_size"], LAYERS)
    assert result["parameters"] == parameters and f"{parameters:,} parameters" in run.stdout

    rows = result["rows"]
    named = [(row["stage"], row["zero"], row["optimizer"]) for row in rows]
    assert named == [("sft", ZERO, name) for name in OPTIMIZERS]
    assert all("failed" not in row and row["timed_steps"] == STEPS - WARMUP for row in rows), rows
    adamw = rows[0]
    for row in rows:
        figures = [row[name] for name in RATIOS]
        assert all(math.isfinite(value) and value > 0 for value in figures), row
        # engine.step() is part of each step, so its median cannot exceed the step's.
        assert row["optimizer_step_ms"] <= row["step_ms"] and row["state_mib"] < row["peak_rss_mib"]
        for name in RATIOS:
            assert row[f"{name}_vs_adamw"] == pytest.approx(row[name] / adamw[name]), name
    # ZeRO-2 on 2 ranks: rank 0 keeps m and v for half the parameters (up to alignment padding and a step counter).
    assert 8 * (parameters // WORLD) <= adamw["state_mib"] * MIB <= 8 * (parameters // WORLD) + 256
    assert all(0.5 < row["state_mib_vs_adamw"] < 1 for row in rows[1:])

    # The printed table: one line per row, its ratios those of the printed figures (to their rounding).
    printed = {tuple(line.split()[:3]): line.split() for line in run.stdout.splitlines()
               if line.split()[:2] == ["sft", str(ZERO)]}
    assert sorted(printed) == sorted(("sft", str(ZERO), name) for name in OPTIMIZERS)
    base = printed[("sft", str(ZERO), "adamw")]
    for name in OPTIMIZERS:
        cells = printed[("sft", str(ZERO), name)]
        tokens, peak, tokens_ratio, peak_ratio = float(cells[5]), float(cells[6]), float(cells[10]), float(cells[11])
        assert tokens > 0 and tokens_ratio == pytest.approx(tokens / float(base[5]), rel=0.01, abs=2e-3)
        assert peak_ratio == pytest.approx(peak / float(base[6]), rel=0.01, abs=2e-3)

    [verdict] = result["verdicts"]
    mini = rows[1]
    assert (verdict["stage"], verdict["zero"]) == ("sft", ZERO)
    assert verdict["tokens_per_s_ratio"] == pytest.approx(mini["tokens_per_s"] / adamw["tokens_per_s"])
    assert verdict["at_least_as_fast"] == (mini["tokens_per_s"] >= adamw["tokens_per_s"])
    assert verdict["state_saved_mib"] == pytest.approx(adamw["state_mib"] - mini["state_mib"])
    assert f"sft ZeRO-{ZERO}: tokens/s x{verdict['tokens_per_s_ratio']:.3f} of AdamW" in run.stdout
