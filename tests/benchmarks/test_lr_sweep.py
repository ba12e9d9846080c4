"""benchmarks/lr_sweep: the table's arithmetic on known per-seed figures (the runs themselves are the
demo stages, exercised elsewhere), its arguments, and the plot it writes."""
import statistics

import pytest

from benchmarks.lr_sweep import STAGES, markdown, parse_args, plot, sensitivity, summarize


def rows_of(stage, values):
    """values: {(optimizer, factor): [per-seed figures]}."""
    return [{"stage": stage, "optimizer": optimizer, "factor": factor, "lr": STAGES[stage].default_lr * factor,
             "seed": seed, "value": value, "seconds": 1.0}
            for (optimizer, factor), figures in values.items() for seed, value in enumerate(figures)]


def test_each_rate_is_mean_and_std_over_seeds_and_the_spread_is_best_minus_worst(tmp_path):
    values = {("adamw", 0.333): [1.30, 1.32, 1.34], ("adamw", 1.0): [1.00, 1.02, 1.04], ("adamw", 3.0): [1.60, 1.70, 1.80],
              ("adam_mini", 0.333): [1.20, 1.22, 1.24], ("adam_mini", 1.0): [1.01, 1.03, 1.05],
              ("adam_mini", 3.0): [1.10, 1.12, 1.14]}
    summary = summarize(rows_of("sft", values))["sft"]
    assert summary["lrs"] == pytest.approx([STAGES["sft"].default_lr * f for f in (0.333, 1.0, 3.0)])
    mean, std, n = summary["cells"]["adamw"][2]
    assert (mean, std, n) == (pytest.approx(1.70), pytest.approx(statistics.stdev([1.6, 1.7, 1.8])), 3)
    assert summary["spread"]["adamw"] == pytest.approx(1.70 - 1.02)
    assert summary["spread"]["adam_mini"] == pytest.approx(1.22 - 1.03)
    # At the default rate the optimizers are 0.01 apart with std 0.02: within the seeds' spread (t = 0.61).
    assert summary["compared"][1]["within_noise"] and summary["compared"][1]["t"] == pytest.approx(0.6124, rel=1e-3)
    assert not summary["compared"][2]["within_noise"]
    text = markdown({"sft": summary})
    assert "final `eval/loss` (lower is better)" in text
    assert "| adamw | 1.32 ± 0.02 | 1.02 ± 0.02 | 1.7 ± 0.1 | 0.68 |" in text
    assert "Spread of the mean across these rates: Adam-mini 0.19, AdamW 0.68; Adam-mini varies less." in text
    # Spreads 0.05 apart with seed std up to 0.1 are not told apart.
    summary["spread"]["adamw"] = 0.24
    assert sensitivity(summary) == ("Spread of the mean across these rates: Adam-mini 0.19, AdamW 0.24; alike within "
                                    "the largest seed std (0.1).")
    plot({"sft": summary}, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_name_the_option(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--stages", "sft,dpo"])
    assert "--stages: unknown dpo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--factors", "1,x"])
    assert "--factors is '1,x'" in capsys.readouterr().err
    assert parse_args(["--factors", "0.5,2", "--seeds", "2"]).factors == [0.5, 2.0]
