"""benchmarks/optimizer_step run as the README runs it, at its fewest steps: every optimizer timed, and the state
bytes it reports held to the parameter count of the Llama it builds, counted here from the config's shapes."""
import json
import math
import subprocess
import sys

import pytest

from benchmarks.optimizer_step import FUSED_ADAMW, MODEL_CONFIG, OFFICIAL
from tests.conftest import REPO_ROOT, rank_env

MIB = 2**20
ADAM_MINI = ("Adam_mini (fused)", "Adam_mini (compiled)", "Adam_mini (foreach)", "Adam_mini (reference)")
ADAMW = ("AdamW (foreach)", FUSED_ADAMW)


def llama_shapes(config: dict) -> list[tuple]:
    """Every parameter's shape in an untied Llama: embedding, per layer q/k/v/o, gate/up/down and two norms,
    final norm, head."""
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
             (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * config["num_hidden_layers"] + [(hidden,), (vocab, hidden)]


@pytest.mark.slow
def test_state_bytes_are_two_moments_per_parameter_for_adamw_and_about_half_for_adam_mini(tmp_path):
    out = tmp_path / "steps.json"
    # --steps 2 is the fewest that give quartiles; one thread, as the machine is shared.
    run = subprocess.run([sys.executable, "-m", "benchmarks.optimizer_step", "--steps", "2", "--warmup", "0",
                          "--threads", "1", "--json", str(out)], cwd=REPO_ROOT, env=rank_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    result = json.loads(out.read_text())
    shapes = llama_shapes(MODEL_CONFIG)
    parameters = sum(math.prod(shape) for shape in shapes)
    matrix_rows = sum(shape[0] for shape in shapes)
    assert result["parameters"] == parameters and f"Llama with {parameters:,} parameters" in run.stdout

    rows = {row["optimizer"]: row for row in result["rows"]}
    assert sorted(rows) == sorted(ADAM_MINI + ADAMW + (OFFICIAL,))
    state = {name: row["state_mb"] * MIB for name, row in rows.items()}
    for name in ADAMW:  # m and v in fp32 for every parameter, plus at most a scalar step counter per tensor
        assert 8 * parameters <= state[name] <= 8 * parameters + 8 * len(shapes), name
    for name in ADAM_MINI + (OFFICIAL,):  # m per parameter; v one per block: at least one per tensor, at most per row
        assert 4 * parameters + 4 * len(shapes) <= state[name] <= 4 * parameters + 4 * matrix_rows, name
        assert 0.5 < rows[name]["state_vs_adamw"] < 0.51
    assert len({state[name] for name in ADAM_MINI}) == 1  # one partition, whatever the implementation

    fused, official = rows[FUSED_ADAMW]["median_ms"], rows[OFFICIAL]["median_ms"]
    for name, row in rows.items():
        assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0 and row["iqr_ms"] >= 0, name
        assert row["vs_fused_adamw"] == pytest.approx(row["median_ms"] / fused)
        assert row["vs_official"] == pytest.approx(row["median_ms"] / official)
        assert row["state_vs_adamw"] == pytest.approx(state[name] / state[FUSED_ADAMW])
        printed = next(line for line in run.stdout.splitlines() if line.startswith(name + "  "))
        assert printed.split()[-2:] == [f"{row['state_mb']:.1f}", f"{row['state_vs_adamw']:.3f}"]

