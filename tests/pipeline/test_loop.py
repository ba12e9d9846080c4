"""The shared training loop: non-finite steps are withheld, counted and logged, and a diverging run
stops with a message; under 2 real DeepSpeed CPU ranks for ZeRO-0, 2 and 3, fp32 and bf16."""
import math

import pytest

from pipeline.loop import NonFiniteStepsError, SkipGuard, StepOutcome
from tests.conftest import REPO_ROOT, launch_ranks, read_json
from tests.pipeline.nonfinite_worker import CASES, POISONED_STEP


def test_skip_guard_counts_skips_in_a_row_and_resets_on_an_applied_step():
    guard = SkipGuard(limit=2)
    skipped, applied = StepOutcome(math.inf, skipped=True), StepOutcome(1.0, skipped=False)
    guard.update(skipped, step=4, total_skipped=1)
    guard.update(applied, step=5, total_skipped=1)
    guard.update(skipped, step=6, total_skipped=2)
    assert guard.in_a_row == 1
    with pytest.raises(NonFiniteStepsError, match=r"steps 6-7: 2 optimizer steps in a row .*"
                                                  r"`training.max_consecutive_skips` is 2"):
        guard.update(skipped, step=7, total_skipped=3)


@pytest.fixture(scope="module")
def nonfinite_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("nonfinite") / "results.json"
    launch_ranks(2, [REPO_ROOT / "tests" / "pipeline" / "nonfinite_worker.py", "--out", out])
    return read_json(out)


@pytest.mark.slow
@pytest.mark.parametrize("case", [name for name, *_ in CASES])
def test_a_non_finite_step_leaves_parameters_and_optimizer_state_untouched(nonfinite_results, case):
    result = nonfinite_results[case]
    # Rank 1 alone produced the non-finite loss; both ranks must have withheld the update, exactly.
    assert result["param_delta_over_skip"] == 0.0
    assert result["state_delta_over_skip"] == 0.0
    assert result["param_delta_next_step"] > 1e-4  # training goes on after the skip
    skipped = result["skipped_steps"]
    assert skipped[:POISONED_STEP - 1] == [0] * (POISONED_STEP - 1)
    assert skipped[POISONED_STEP - 1:] == [1] * (len(skipped) - POISONED_STEP + 1)
    assert math.isinf(result["grad_norm"][POISONED_STEP - 1])
    assert all(math.isfinite(norm) for index, norm in enumerate(result["grad_norm"]) if index != POISONED_STEP - 1)
    # The schedule waits too: the step after the skip uses the skipped step's rate.
    assert result["lr"][POISONED_STEP] == result["lr"][POISONED_STEP - 1]
    assert all(math.isfinite(loss) for index, loss in enumerate(result["loss"]) if index != POISONED_STEP - 1)


@pytest.mark.slow
def test_a_diverging_run_stops_after_the_configured_skips_keeping_its_checkpoints(nonfinite_results):
    result = nonfinite_results["diverging"]
    assert result["message"] is not None and "steps 3-4: 2 optimizer steps in a row" in result["message"]
    assert "`training.max_consecutive_skips` is 2" in result["message"]
    assert result["logged_steps"] == [1, 2, 3, 4]  # the skipped steps are logged before it stops
    assert result["complete_checkpoints"] == ["step_2"]
    assert not result["final_written"]  # a diverged model is not exported as the run's result
